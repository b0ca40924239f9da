"""`python -m bench`: benchmark the real gateway. See docs/BENCHMARKS.md.

python -m bench                                  # full run: N = 1,000 and 10,000
python -m bench --streams 1000 --cpu-window 10   # quicker
python -m bench --markdown                       # print the table as Markdown (for the doc)
python -m bench --report bench/results/latest.json --markdown   # re-render, no run
python -m bench --profile --memory-profile       # also py-spy and tracemalloc breakdowns
python -m bench --profile-client-ab --markdown   # only: lean profile client vs httpx (~2 min)
python -m bench --webhooks-ab --markdown         # only: webhooks off vs on, a slow receiver (~2 min)
python -m bench --limits-ab --markdown           # only: abuse limits off vs on, the honest path (~2 min)
python -m bench --reconnect-storm --streams 10000 # only: reconnects per 100 ms after a restart
python -m bench --scaleout --sample 400 --markdown  # only: SQLite vs PostgreSQL vs --workers 2 (~4 min)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.procs import BenchError


def _ints(text: str) -> list[int]:
    values = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return values


PHASES = (
    "streams",
    "throughput",
    "polling",
    "profile-client-ab",
    "webhooks-ab",
    "limits-ab",
    "reconnect-storm",
    "scaleout",
)


def _phases(text: str) -> tuple[str, ...]:
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in chosen if x not in PHASES]
    if unknown:
        raise SystemExit(f"python -m bench: error: unknown phase(s) {', '.join(unknown)}; known: {', '.join(PHASES)}")
    return chosen


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--streams", type=_ints, default=[1000, 10000], help="idle stream counts N (default 1000,10000)")
    p.add_argument("--sample", type=int, default=200, help="sessions timed for delivery latency (default 200)")
    p.add_argument("--concurrency", type=int, default=32, help="throughput workers, over 2 processes (default 32)")
    p.add_argument("--duration", type=float, default=10.0, help="throughput window, seconds (default 10)")
    p.add_argument(
        "--warmup", type=float, default=None, help="throughput warm-up, seconds (default min(1, duration/5))"
    )
    p.add_argument("--cpu-window", type=float, default=30.0, help="idle CPU window, seconds (default 30)")
    p.add_argument("--heartbeat", type=float, default=15.0, help="gateway stream.heartbeat, seconds (default 15)")
    p.add_argument("--open-concurrency", type=int, default=256, help="in-flight stream opens (default 256)")
    p.add_argument("--create-concurrency", type=int, default=64, help="in-flight session creations (default 64)")
    p.add_argument("--poll-sessions", type=int, default=20, help="sessions each for polling vs SSE (default 20)")
    p.add_argument("--poll-interval", type=float, default=3.0, help="polling interval, seconds (default 3)")
    p.add_argument(
        "--poll-offset-max",
        type=float,
        default=None,
        help="callback at a random offset up to this many seconds (default: the poll interval)",
    )
    p.add_argument("--leak-cycles", type=int, default=2, help="extra open/close rounds for the leak check (default 2)")
    p.add_argument(
        "--settle-scale",
        type=float,
        default=1.0,
        help="scale of the waits for a steady state before the streams phase's memory readings"
        " (default 1: 0.5 s after creating, 1 s after opening, 3 s after closing)",
    )
    p.add_argument(
        "--floor-samples", type=int, default=200, help="requests and fdatasyncs each for the 10 ms-pace floor"
    )
    p.add_argument("--max-per-process", type=int, default=4000, help="streams per load-generator process")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest.json"), help="results JSON")
    p.add_argument("--profile", action="store_true", help="py-spy the gateway (open, idle, throughput phases)")
    p.add_argument(
        "--memory-profile",
        action="store_true",
        help="extra phase: per-stream memory by source line (tracemalloc) and object type",
    )
    p.add_argument(
        "--phases",
        default="streams,throughput,polling",
        help="which phases to run, comma-separated (default streams,throughput,polling;"
        " also: profile-client-ab, webhooks-ab)",
    )
    p.add_argument(
        "--switch-interval",
        type=float,
        metavar="S",
        help="experiment: run the gateway with sys.setswitchinterval(S) (GIL hand-off cost)",
    )
    p.add_argument(
        "--profile-client-ab",
        action="store_true",
        help="run only the A/B of the profile fetch client, lean HTTP/1.1 vs httpx (= --phases profile-client-ab)",
    )
    p.add_argument(
        "--reconnect-storm",
        action="store_true",
        help="run only the restart storm: reconnects per 100 ms, closes at once vs spread (= --phases reconnect-storm)",
    )
    p.add_argument(
        "--webhooks-ab",
        action="store_true",
        help="run only the A/B of webhooks off vs on, to a slow receiver (= --phases webhooks-ab)",
    )
    p.add_argument(
        "--limits-ab",
        action="store_true",
        help="run only the A/B of [limits] off vs on, the honest path (= --phases limits-ab)",
    )
    p.add_argument(
        "--scaleout",
        action="store_true",
        help="run only the scale-out comparison: SQLite, PostgreSQL, serve --workers 2 on PostgreSQL;"
        " delivery across two instances; memory per stream on both (= --phases scaleout)",
    )
    p.add_argument(
        "--ab-rounds",
        type=int,
        default=2,
        help="A/B rounds; each is one leg per client, in alternating order (default 2: lean, httpx, httpx, lean)",
    )
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--report", type=Path, help="render this results JSON instead of running")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from bench import report

    if args.report is not None:
        results = json.loads(args.report.read_text())
    else:
        from bench.run import Options, run

        opts = Options(
            streams=args.streams,
            sample=args.sample,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup if args.warmup is not None else min(1.0, args.duration / 5),
            cpu_window=args.cpu_window,
            heartbeat=args.heartbeat,
            open_concurrency=args.open_concurrency,
            create_concurrency=args.create_concurrency,
            poll_sessions=args.poll_sessions,
            poll_interval=args.poll_interval,
            poll_offset_max=args.poll_offset_max if args.poll_offset_max is not None else args.poll_interval,
            leak_cycles=args.leak_cycles,
            settle_scale=args.settle_scale,
            floor_samples=args.floor_samples,
            max_per_process=args.max_per_process,
            out=args.out,
            profile=args.profile,
            memory_profile=args.memory_profile,
            phases=("profile-client-ab",)
            if args.profile_client_ab
            else ("webhooks-ab",)
            if args.webhooks_ab
            else ("limits-ab",)
            if args.limits_ab
            else ("reconnect-storm",)
            if args.reconnect_storm
            else ("scaleout",)
            if args.scaleout
            else _phases(args.phases),
            switch_interval=args.switch_interval,
            ab_rounds=max(1, args.ab_rounds),
            quiet=args.quiet,
        )
        try:
            results = run(opts)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted; every process it started was stopped", file=sys.stderr)
            return 130
        if not args.quiet:
            print(f"[bench] results written to {opts.out}", file=sys.stderr)
    print(report.machine_line(results))
    print()
    print(report.markdown(results) if args.markdown else report.text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
