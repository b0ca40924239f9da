"""`python -m bench --scaleout`: SQLite against PostgreSQL, one process against `serve --workers 2`.

One run, on one machine, of three measurements (docs/BENCHMARKS.md, "Scale-out"):

1. Verifications/s (the throughput measurement of `Bench.verifications`) on
   (a) one gateway process on SQLite, (b) one on PostgreSQL, (c) `gateway serve --workers 2`
   on PostgreSQL (one port), in the order a, b, c, c, b, a (`--ab-rounds` rounds, every other
   one reversed), each leg a fresh gateway on a fresh database. Over each window the CPU
   seconds of the gateway's processes, of PostgreSQL (every process of the cluster), of the
   load generators and of the fake profile host are read from /proc: on 2 cores they compete.
2. Delivery callback -> outcome on an open stream, paced as in `Bench.delivery`: on SQLite and
   on PostgreSQL with the stream and the callback on one instance, and across two instances
   (two `gateway serve` on two ports, one database): the stream is held by B, the callback
   goes to A, the outcome reaches B through LISTEN/NOTIFY.
3. Memory per idle stream: RSS growth / N for N open streams (N = the largest --streams),
   SQLite against PostgreSQL.

PostgreSQL is started by the bench itself (bench/pgcluster.py: on disk, fsync and
synchronous_commit on, like SQLite's synchronous=FULL) and stopped at the end, on errors and
on Ctrl+C.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import TYPE_CHECKING, Any

from bench import procs
from bench.pgcluster import PgServer
from bench.procs import BenchError, Service

if TYPE_CHECKING:
    from bench.run import Bench

LEGS = {
    "a": "SQLite, 1 process",
    "b": "PostgreSQL, 1 process",
    "c": "PostgreSQL, serve --workers 2",
}
DELIVERY_MODES = {
    "sqlite": "SQLite, same instance",
    "pg-same": "PostgreSQL, same instance",
    "pg-cross": "PostgreSQL, stream on B, callback to A",
}
TARGET_RATIO = 1.6  # (c) : (a)
TARGET_CROSS_P50_MS, TARGET_CROSS_P99_MS = 3.0, 10.0
TARGET_KIB_PER_STREAM = 16.0
POOL_MIN, POOL_MAX = 2, 10
WARMUP = 8  # unmeasured verifications before a delivery measurement


def _order(keys: tuple[str, ...], rounds: int) -> list[str]:
    return [k for r in range(rounds) for k in (keys if r % 2 == 0 else keys[::-1])]


class Scaleout:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.opts = bench.opts
        self.pg = PgServer(bench.tmp / "pg")
        bench.stack.callback(self.pg.stop)
        self.databases = 0
        self.shutdowns: list[dict[str, Any]] = []

    # -- gateways --------------------------------------------------------------------------
    def start(self, name: str, *, url: str | None = None, workers: int = 1, port: int | None = None) -> Service:
        """A fresh gateway (limits off: every bench client is 127.0.0.1), SQLite unless `url`."""
        from bench.run import _env_with_repo, gateway_config

        bench = self.bench
        assert bench.fake is not None
        work = bench.tmp / name
        work.mkdir(exist_ok=True)
        port = port or procs.free_port()
        text = gateway_config(work / "gateway.db", port, bench.fake.port, self.opts)
        if url is not None:
            text = text.replace(
                "[database]\n", f'[database]\nurl = "{url}"\npool_min = {POOL_MIN}\npool_max = {POOL_MAX}\n'
            )
        text += "\n[limits]\nenabled = false\n"
        config = work / "config.toml"
        config.write_text(text)
        argv = procs.python_argv("-m", "gateway", "serve", "--config", str(config))
        if workers > 1:
            argv += ["--workers", str(workers)]
        svc = Service(f"gateway[{name}]", argv, port, work / "gateway.log")
        svc.start(work, _env_with_repo())
        bench.stack.callback(svc.stop)
        svc.wait_ready(timeout=60)
        if workers > 1:
            self._wait_workers(svc, workers)
        bench.gateway_loop = procs.event_loop_of(procs.tree(svc.pid)[-1])  # a worker's, under --workers
        return svc

    def _wait_workers(self, svc: Service, workers: int, timeout: float = 60.0) -> None:
        """Until every worker answered: SO_REUSEPORT hands each new connection to one of them."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < workers:
            if time.monotonic() > deadline:
                raise BenchError(f"{svc.name}: only workers {sorted(seen)} answered:\n{svc.log_tail()}")
            try:
                status, body = procs.http_get(svc.port, "/metrics", timeout=1.0)
            except OSError:
                status, body = 0, b""
            if status == 200:
                for line in body.decode().splitlines():
                    if line.startswith("gateway_instance_info{"):
                        seen.add(line.split('worker="', 1)[1].split('"', 1)[0])
            time.sleep(0.02)

    def stop(self, svc: Service, label: str) -> None:
        svc.stop()
        self.shutdowns.append({"phase": label, "seconds": svc.stop_seconds, "exit_code": svc.exit_code})
        if svc.exit_code != 0:
            raise BenchError(f"{svc.name} exited with {svc.exit_code}:\n{svc.log_tail()}")

    def database(self) -> str:
        self.databases += 1
        return self.pg.createdb(f"bench_{self.databases}")

    def gateway_pids(self, svc: Service) -> list[int]:
        return procs.tree(svc.pid)

    # -- 1. verifications/s ----------------------------------------------------------------
    def throughput(self) -> list[dict[str, Any]]:
        bench, opts = self.bench, self.opts
        assert bench.pool is not None and bench.fake is not None
        fake_pid, loadgens = bench.fake.pid, [p.pid for p in bench.pool.procs if p.pid is not None]
        legs: list[dict[str, Any]] = []
        order = _order(tuple(LEGS), opts.ab_rounds)
        for k, leg in enumerate(order, 1):
            from bench.run import log

            log(opts, f"scale-out throughput, leg {k} of {len(order)}: ({leg}) {LEGS[leg]}")
            label = f"scaleout-{k}-{leg}"
            url = None if leg == "a" else self.database()
            svc = self.start(label, url=url, workers=2 if leg == "c" else 1)
            pids = self.gateway_pids(svc)
            groups = {
                "gateway": lambda svc=svc: self.gateway_pids(svc),
                "postgres": self.pg.pids,
                "loadgen": lambda: list(loadgens),
                "fake_profile_host": lambda: [fake_pid],
            }
            flow = bench.verifications(svc, label, cpu_groups=groups)
            workers_after = self.gateway_pids(svc)
            self.stop(svc, label)
            if flow["errors"]:
                raise BenchError(f"scale-out leg {k} ({leg}): {flow['errors']} errors: {flow['first_error']}")
            g = flow["cpu_groups"]
            window = g["window_s"]
            per_verification = {name: 1000 * used / max(flow["completed"], 1) for name, used in g["cpu_s"].items()}
            legs.append(
                {
                    "leg": k,
                    "kind": leg,
                    "label": LEGS[leg],
                    "gateway_processes": len(pids),
                    "gateway_restarted": sorted(pids) != sorted(workers_after),
                    "verifications_per_s": flow["verifications_per_s"],
                    "throughput": flow,
                    "cpu_pct_of_one_core": {name: 100 * used / window for name, used in g["cpu_s"].items()},
                    "machine_busy_pct_of_one_core": 100 * g["machine_busy_s"] / window,
                    # what ran besides the gateway, PostgreSQL, the load generators and the fake host
                    "other_pct_of_one_core": 100 * (g["machine_busy_s"] - sum(g["cpu_s"].values())) / window,
                    "cpu_ms_per_verification": per_verification,
                }
            )
        return legs

    # -- 2. delivery -----------------------------------------------------------------------
    def delivery(self) -> list[dict[str, Any]]:
        bench, opts = self.bench, self.opts
        pool = bench.pool
        assert pool is not None
        from bench.run import log

        sample = max(opts.sample, 4)
        out: list[dict[str, Any]] = []
        order = _order(tuple(DELIVERY_MODES), opts.ab_rounds)
        for k, mode in enumerate(order, 1):
            log(opts, f"scale-out delivery, leg {k} of {len(order)}: {DELIVERY_MODES[mode]}")
            label = f"delivery-{k}-{mode}"
            url = None if mode == "sqlite" else self.database()
            holder = self.start(label + "-b" if mode == "pg-cross" else label, url=url)
            caller = self.start(label + "-a", url=url) if mode == "pg-cross" else None
            pool.all("target", host="127.0.0.1", port=holder.port)
            opened = sample + WARMUP
            bench.create_sample(opened, opened)
            bench.open_sample(opened, opened)
            warm: dict[str, Any] = {"op": "probe", "tag": "sample", "endpoint": bench.endpoint, "gap": 0.0}
            if caller is not None:
                warm["callback_port"] = caller.port
            r = pool.call({0: {**warm, "concurrency": 1, "limit": WARMUP}})[0]
            if r["errors"] or len(r["rows"]) != WARMUP:
                raise BenchError(f"scale-out delivery {label}: warm-up failed: {r['first_error']}")
            result: dict[str, Any] = {}
            paced = bench.delivery(holder, sample, sample, result, floor=False, callback_svc=caller)
            pool.all("close")
            for svc, name in ((caller, label + "-a"), (holder, label)):
                if svc is not None:
                    self.stop(svc, name)
            errors = sum(result[key]["errors"] for key in ("latency", "latency_back_to_back") if key in result)
            if errors:
                raise BenchError(f"scale-out delivery {label}: {errors} errors: {result['latency']['first_error']}")
            out.append({"leg": k, "mode": mode, "label": DELIVERY_MODES[mode], "paced_e2e_ms": paced, **result})
        return out

    # -- 3. memory per idle stream ---------------------------------------------------------
    def memory(self) -> list[dict[str, Any]]:
        bench, opts = self.bench, self.opts
        pool = bench.pool
        assert pool is not None
        from bench.run import log, split

        n = max(opts.streams)
        out: list[dict[str, Any]] = []
        order = _order(("sqlite", "postgresql"), opts.ab_rounds)
        for k, backend in enumerate(order, 1):
            log(opts, f"scale-out memory, leg {k} of {len(order)}: {n} idle streams on {backend}")
            label = f"memory-{k}-{backend}"
            svc = self.start(label, url=None if backend == "sqlite" else self.database())
            pool.all("target", host="127.0.0.1", port=svc.port)
            shares = split(n, pool.size)
            per = max(1, opts.create_concurrency // pool.size)
            replies = pool.call(
                {i: {"op": "create", "count": shares[i], "concurrency": per, "tag": "hold"} for i in range(pool.size)}
            )
            created = sum(r["created"] for r in replies.values())
            if created != n:
                first = next((r["first_error"] for r in replies.values() if r["first_error"]), None)
                raise BenchError(f"scale-out memory {label}: created {created} of {n}: {first}")
            time.sleep(0.5)
            before = procs.memory(svc.pid)
            per = max(1, opts.open_concurrency // pool.size)
            replies = pool.call(
                {i: {"op": "open", "concurrency": per, "tag": "hold", "keep_data": False} for i in range(pool.size)}
            )
            opened = sum(r["opened"] for r in replies.values())
            span = max(r["t1"] for r in replies.values()) - min(r["t0"] for r in replies.values())
            if opened != n:
                first = next((r["first_error"] for r in replies.values() if r["first_error"]), None)
                raise BenchError(f"scale-out memory {label}: opened {opened} of {n}: {first}")
            on_server = bench.wait_open_streams(svc, n, timeout=10)
            time.sleep(1.0)
            after = procs.memory(svc.pid)
            pg_backends = len(self.pg.pids())
            pool.all("close")
            bench.wait_open_streams(svc, 0)
            self.stop(svc, label)
            row: dict[str, Any] = {
                "leg": k,
                "backend": backend,
                "n": n,
                "server_open_streams": on_server,
                "streams_per_s": opened / span if span > 0 else float("nan"),
                "rss_kib_before": before["rss_kib"],
                "rss_kib_with_streams": after["rss_kib"],
                "kib_per_stream": (after["rss_kib"] - before["rss_kib"]) / n,
                "postgres_processes_with_streams_open": pg_backends,
            }
            if before["pss_kib"] is not None and after["pss_kib"] is not None:
                row["pss_kib_per_stream"] = (after["pss_kib"] - before["pss_kib"]) / n
            out.append(row)
        return out


def _summaries(s: Scaleout, legs: list[dict[str, Any]], deliveries: list[dict[str, Any]],
               memory: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    from bench.run import summary

    by_leg: dict[str, Any] = {}
    for kind in LEGS:
        mine = [leg for leg in legs if leg["kind"] == kind]
        if not mine:
            continue
        names = mine[0]["cpu_pct_of_one_core"].keys()
        by_leg[kind] = {
            "label": LEGS[kind],
            "verifications_per_s": statistics.fmean(leg["verifications_per_s"] for leg in mine),
            "verifications_per_s_legs": [leg["verifications_per_s"] for leg in mine],
            "cpu_pct_of_one_core": {n: statistics.fmean(leg["cpu_pct_of_one_core"][n] for leg in mine) for n in names},
            "cpu_ms_per_verification": {
                n: statistics.fmean(leg["cpu_ms_per_verification"][n] for leg in mine) for n in names
            },
            "machine_busy_pct_of_one_core": statistics.fmean(leg["machine_busy_pct_of_one_core"] for leg in mine),
            "other_pct_of_one_core": statistics.fmean(leg["other_pct_of_one_core"] for leg in mine),
        }
    by_mode: dict[str, Any] = {}
    for mode in DELIVERY_MODES:
        mine = [d for d in deliveries if d["mode"] == mode]
        if not mine:
            continue
        by_mode[mode] = {
            "label": DELIVERY_MODES[mode],
            "delivery_ms": summary([x for d in mine for x in d["paced_e2e_ms"]]),
            "delivery_p50_legs_ms": [d["latency"]["e2e_ms"]["p50"] for d in mine],
            "delivery_p99_legs_ms": [d["latency"]["e2e_ms"]["p99"] for d in mine],
            "back_to_back_p50_legs_ms": [
                d["latency_back_to_back"]["e2e_ms"]["p50"] for d in mine if "latency_back_to_back" in d
            ],
            "callback_answer_p50_legs_ms": [d["latency"]["callback_answer_ms"]["p50"] for d in mine],
            "gateway_mean_ms_legs": [d["latency"]["gateway_mean_ms"] for d in mine],
        }
    by_backend: dict[str, Any] = {}
    for backend in ("sqlite", "postgresql"):
        mine = [m for m in memory if m["backend"] == backend]
        if mine:
            by_backend[backend] = {
                "n": mine[0]["n"],
                "kib_per_stream": statistics.fmean(m["kib_per_stream"] for m in mine),
                "kib_per_stream_legs": [m["kib_per_stream"] for m in mine],
            }
    ratio = (
        by_leg["c"]["verifications_per_s"] / by_leg["a"]["verifications_per_s"]
        if "a" in by_leg and "c" in by_leg
        else float("nan")
    )
    cross = by_mode.get("pg-cross", {}).get("delivery_ms", {})
    return {
        "throughput": by_leg,
        "ratio_c_to_a": ratio,
        "ratio_b_to_a": by_leg["b"]["verifications_per_s"] / by_leg["a"]["verifications_per_s"]
        if "a" in by_leg and "b" in by_leg
        else float("nan"),
        "delivery": by_mode,
        "memory": by_backend,
        "targets": {
            "ratio_c_to_a": {"target": f">= {TARGET_RATIO}", "met": ratio >= TARGET_RATIO},
            "cross_instance_p50_ms": {
                "target": f"<= {TARGET_CROSS_P50_MS:g} ms",
                "met": cross.get("p50", float("inf")) <= TARGET_CROSS_P50_MS,
            },
            "cross_instance_p99_ms": {
                "target": f"<= {TARGET_CROSS_P99_MS:g} ms",
                "met": cross.get("p99", float("inf")) <= TARGET_CROSS_P99_MS,
            },
            "kib_per_stream": {
                "target": f"<= {TARGET_KIB_PER_STREAM:g} KiB on either backend",
                "met": all(b["kib_per_stream"] <= TARGET_KIB_PER_STREAM for b in by_backend.values()),
            },
        },
    }


def scaleout_phase(bench: Bench) -> dict[str, Any]:
    """The whole scale-out comparison; PostgreSQL is stopped again by the bench's exit stack."""
    from bench.run import log

    opts = bench.opts
    log(opts, "scale-out: initdb and start a durable PostgreSQL on disk")
    s = Scaleout(bench)
    s.pg.start()
    settings = s.pg.settings()
    if settings.get("fsync") != "on" or settings.get("synchronous_commit") != "on":
        raise BenchError(f"the bench's PostgreSQL is not durable: {settings}")
    legs = s.throughput()
    deliveries = s.delivery()
    memory = s.memory() if opts.streams else []
    return {
        "order": _order(tuple(LEGS), opts.ab_rounds),
        "legs": legs,
        "deliveries": deliveries,
        "memory": memory,
        "summary": _summaries(s, legs, deliveries, memory),
        "postgresql": {"settings": settings, "data_dir_on": _filesystem(s.pg.data), "pool": [POOL_MIN, POOL_MAX]},
        "sqlite": {"synchronous": "FULL (the gateway's setting)"},
        "shutdowns": s.shutdowns,
        "loadgen_processes": bench.pool.size if bench.pool else 0,
    }


def _filesystem(path: os.PathLike[str]) -> str:
    """The filesystem type under `path` (ext4, tmpfs, ...), from /proc/mounts."""
    best, kind = "", "unknown"
    target = os.path.realpath(path)
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and target.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


# -- report ----------------------------------------------------------------------------------
def rows(so: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (metric, measured, target, result) for bench/report.py's table."""

    def num(value: float, digits: int = 0) -> str:
        return f"{value:,.{digits}f}"

    def cpu(shares: dict[str, float]) -> str:
        return " / ".join(
            num(shares.get(k, float("nan"))) for k in ("gateway", "postgres", "loadgen", "fake_profile_host")
        )

    def verdict(key: str) -> tuple[str, str]:
        t = so["summary"]["targets"][key]
        return str(t["target"]), "met" if t["met"] else "**MISSED**"

    out: list[tuple[str, str, str, str]] = []
    for leg in so["legs"]:
        flow = leg["throughput"]
        out.append(
            (
                f"[scale-out leg {leg['leg']}: ({leg['kind']}) {leg['label']}] verifications/s; CPU % of one core:"
                " gateway / PostgreSQL / load generators / fake profile host; machine busy (of which other)",
                f"{num(leg['verifications_per_s'])}/s (errors {flow['errors']}); "
                f"{cpu(leg['cpu_pct_of_one_core'])}; {num(leg['machine_busy_pct_of_one_core'])}% "
                f"({num(leg['other_pct_of_one_core'])}%)",
                "",
                "",
            )
        )
    summary = so["summary"]
    for kind, s in summary["throughput"].items():
        out.append(
            (
                f"[scale-out ({kind}) {s['label']}] verifications/s, mean of legs; CPU ms per verification:"
                " gateway / PostgreSQL / load generators / fake profile host",
                f"{num(s['verifications_per_s'])}/s ({', '.join(num(v) for v in s['verifications_per_s_legs'])}); "
                + " / ".join(
                    num(s["cpu_ms_per_verification"][k], 2)
                    for k in ("gateway", "postgres", "loadgen", "fake_profile_host")
                ),
                "",
                "",
            )
        )
    out.append(
        (
            "[scale-out] (c) : (a) verifications/s; (b) : (a)",
            f"{summary['ratio_c_to_a']:.2f}; {summary['ratio_b_to_a']:.2f}",
            *verdict("ratio_c_to_a"),
        )
    )
    for mode, d in summary["delivery"].items():
        lat = d["delivery_ms"]
        target, result = ("", "")
        if mode == "pg-cross":
            target = f"p50 {summary['targets']['cross_instance_p50_ms']['target']}, p99 " + str(
                summary["targets"]["cross_instance_p99_ms"]["target"]
            )
            met = (
                summary["targets"]["cross_instance_p50_ms"]["met"]
                and summary["targets"]["cross_instance_p99_ms"]["met"]
            )
            result = "met" if met else "**MISSED**"
        out.append(
            (
                f"[scale-out delivery: {d['label']}] callback -> outcome, p50/p90/p99/max ({lat['n']} paced samples);"
                " back to back p50 of legs",
                f"{num(lat['p50'], 2)} / {num(lat['p90'], 2)} / {num(lat['p99'], 2)} / {num(lat['max'], 2)} ms; "
                + ", ".join(num(v, 2) for v in d["back_to_back_p50_legs_ms"])
                + " ms",
                target,
                result,
            )
        )
    for backend, m in summary["memory"].items():
        out.append(
            (
                f"[scale-out memory: {backend}] RSS growth / N with N = {m['n']:,} idle streams (legs)",
                f"{num(m['kib_per_stream'], 1)} KiB ({', '.join(num(v, 1) for v in m['kib_per_stream_legs'])})",
                *verdict("kib_per_stream"),
            )
        )
    return out
