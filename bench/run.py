"""The benchmark orchestrator: starts the real gateway, the fake profile host and the load generators.

Phases (each in a fresh gateway process with a fresh SQLite file unless said otherwise):

1. For every N in --streams: create N sessions, open N idle streams (the `sample` streams
   first, in the measuring worker), record RSS/PSS before and after, the open rate, the idle
   CPU over --cpu-window s, the delivery latency callback → `outcome` on the sampled streams,
   then close every stream and compare RSS with the pre-stream baseline (plus --leak-cycles
   open/close rounds).
2. Throughput: complete verifications/s with --concurrency workers over --duration s, then a
   trivial Starlette JSON endpoint (same uvicorn settings) hit by the same client code.
3. Polling vs SSE: --poll-sessions concurrent verifications each way, callback at a random
   offset; time to outcome and requests per verification.
4. Startup: spawn → /readyz 200 for every gateway started, plus a restart on the throughput
   database; SIGTERM → exit for every stop.
5. Only when asked (`--profile-client-ab`, or the phase `profile-client-ab`): the Truecaller
   profile fetch on the lean HTTP/1.1 client against httpx, alternating in fresh gateways,
   each leg with the paced delivery measurement of 1. and the throughput measurement of 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench import procs
from bench.loadgen import raise_nofile_limit, worker_main
from bench.procs import BenchError, Service

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

# The profile-client A/B (`python -m bench --profile-client-ab`).
AB_CLIENTS = ("lean", "httpx")
AB_MARGIN = 0.15
AB_WARMUP = 8  # verifications on every A/B gateway before the delivery measurement
# The webhooks A/B (`python -m bench --webhooks-ab`): a slow receiver, so the outbox backs up.
WEBHOOK_MODES = ("off", "on")
WEBHOOK_RECEIVER_DELAY_MS = 20.0
WEBHOOK_DRAIN_TIMEOUT = 120.0
# The limits A/B (`python -m bench --limits-ab`): every [limits] check on, against all off.
LIMIT_MODES = ("off", "on")
# "on" keeps the defaults but runs every check in full for the bench's clients, which all come
# from 127.0.0.1: that address is not exempt, and its per-address allowances are raised so the
# honest load is never refused (the checks cost the same whatever the numbers are).
LIMITS_ON = """
[limits]
enabled = true
exempt = []
sessions_per_ip_burst = 1000000
sessions_per_ip_rate = 6000000
callbacks_per_ip_burst = 1000000
callbacks_per_ip_rate = 6000000
streams_per_ip = 10000
"""
AB_RULE = (
    "httpx is within 15% when its verifications/s are at least 85% of the lean client's and its "
    "paced delivery p50 at most 115% of the lean client's (each client over all of its legs)"
)


def _metric(body: bytes, name: bytes, labels: bytes = b"") -> float | None:
    """One series of a Prometheus text answer (`labels` as printed, e.g. `{provider="x"}`)."""
    pattern = rb"^" + re.escape(name) + (re.escape(labels) if labels else rb"(?:\{\})?") + rb" ([0-9.e+-]+)$"
    match = re.search(pattern, body, re.M)
    return float(match.group(1)) if match else None


# (series name, label set) of the histograms `gateway_timings` reads.
_DELIVERY_SERIES = {
    "callback": (b"gateway_callback_seconds", b'{provider="truecaller"}'),
    "profile_fetch": (b"gateway_provider_fetch_seconds", b'{operation="profile",provider="truecaller"}'),
    "durable_write": (b"gateway_db_write_seconds", b""),
}


@dataclass
class Options:
    streams: list[int] = field(default_factory=lambda: [1000, 10000])
    sample: int = 200
    concurrency: int = 32
    duration: float = 10.0
    warmup: float = 1.0
    cpu_window: float = 30.0
    heartbeat: float = 15.0
    open_concurrency: int = 256  # in-flight stream opens, over all workers
    create_concurrency: int = 64  # in-flight session creations, over all workers
    poll_sessions: int = 20
    poll_interval: float = 3.0
    poll_offset_max: float = 3.0
    leak_cycles: int = 2
    # Scale of the waits for a steady state before each memory reading of the streams phase
    # (0.5 s after creating, 1 s after opening, 3 s after closing); the smoke test shrinks them.
    settle_scale: float = 1.0
    floor_samples: int = 200  # requests and fdatasyncs each for the 10 ms-pace floor
    max_per_process: int = 4000
    out: Path = Path("bench/results/latest.json")
    profile: bool = False
    memory_profile: bool = False
    phases: tuple[str, ...] = ("streams", "throughput", "polling")
    switch_interval: float | None = None  # run the gateway with sys.setswitchinterval(this)
    ab_rounds: int = 2  # profile-client A/B: rounds of (lean, httpx), every other one reversed
    quiet: bool = False


def log(opts: Options, message: str) -> None:
    if not opts.quiet:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values),
        "min": min(values),
    }


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- worker pool ------------------------------------------------------------------------------
class Pool:
    """Load-generator processes (spawn), each answering one command at a time over a pipe."""

    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for i in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, i), name=f"bench-loadgen-{i}", daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def size(self) -> int:
        return len(self.pipes)

    def send(self, i: int, op: str, **args: Any) -> None:
        self.pipes[i].send({"op": op, **args})

    def recv(self, i: int, timeout: float = 600.0) -> dict[str, Any]:
        if not self.pipes[i].poll(timeout):
            raise BenchError(f"load generator {i} did not answer within {timeout:.0f} s")
        reply: dict[str, Any] = self.pipes[i].recv()
        if "error" in reply:
            raise BenchError(f"load generator {i}: {reply['error']}\n{reply.get('traceback', '')}")
        return reply

    def call(self, commands: dict[int, dict[str, Any]], timeout: float = 600.0) -> dict[int, dict[str, Any]]:
        for i, command in commands.items():
            self.send(i, **command)
        return {i: self.recv(i, timeout) for i in commands}

    def all(self, op: str, timeout: float = 600.0, **args: Any) -> dict[int, dict[str, Any]]:
        return self.call({i: {"op": op, **args} for i in range(self.size)}, timeout)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send({"op": "exit"})
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for pipe in self.pipes:
            pipe.close()


# -- services ----------------------------------------------------------------------------------
def _env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def gateway_config(db: Path, port: int, fake_port: int, opts: Options) -> str:
    return f"""# written by `python -m bench`
[server]
host = "{HOST}"
port = {port}

[database]
path = "{db}"

[sessions]
ttl = 86400

[stream]
heartbeat = {opts.heartbeat}
max_duration = 86400

[logging]
level = "warning"
format = "json"

[providers.truecaller]
# a Truecaller session lives min(sessions.ttl, callback_timeout); 600 is the most allowed
callback_timeout = 600
require_https = false
require_public_ip = false
profile_hosts = ["{HOST}:{fake_port}"]

[providers.veriphone]
enabled = false
"""


class Bench:
    def __init__(self, opts: Options, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.opts = opts
        self.tmp = tmp
        self.stack = stack
        self.results_dir = opts.out.parent
        self.startups: list[float] = []
        self.shutdowns: list[dict[str, Any]] = []
        self.profiles: dict[str, Any] = {}
        self.fake: Service | None = None
        self.pool: Pool | None = None
        self.gateway_loop = "unknown"
        self.databases: dict[str, Path] = {}

    # services
    def start_fake(self) -> Service:
        port = procs.free_port()
        svc = Service(
            "fake-profile-host",
            procs.python_argv("-m", "bench.fake_profile", "--port", str(port)),
            port,
            self.tmp / "fake.log",
        )
        svc.start(self.tmp, _env_with_repo())
        self.stack.callback(svc.stop)
        svc.wait_ready()
        return svc

    @property
    def endpoint(self) -> str:
        assert self.fake is not None
        return f"http://{HOST}:{self.fake.port}/v1/default"

    def start_gateway(
        self,
        name: str,
        *,
        db: Path | None = None,
        traced: Path | None = None,
        profile_client: str | None = None,
        webhooks: str | None = None,
        limits: str | None = None,
        port: int | None = None,
        server_extra: str = "",
        stream_extra: str = "",
    ) -> Service:
        assert self.fake is not None
        work = self.tmp / name
        work.mkdir(exist_ok=True)
        db = db or work / "gateway.db"
        port = port or procs.free_port()
        config = work / "config.toml"
        text = gateway_config(db, port, self.fake.port, self.opts)
        text = text.replace("[server]\n", "[server]\n" + server_extra).replace(
            "[stream]\n", "[stream]\n" + stream_extra
        )
        if webhooks is not None:
            text += f'\n[webhooks]\nurl = "{webhooks}"\nconcurrency = 8\nmax_attempts = 100\n'
        if limits is not None:
            text += LIMITS_ON if limits == "on" else "\n[limits]\nenabled = false\n"
        config.write_text(text)
        runner: list[str] = []
        if traced is not None:
            runner += ["--tracemalloc", str(traced)]
        if self.opts.switch_interval is not None:
            runner += ["--switch-interval", str(self.opts.switch_interval)]
        if profile_client is not None:
            runner += ["--profile-client", profile_client]
        if runner:
            argv = procs.python_argv("-m", "bench.gateway_runner", *runner, "--", "serve", "--config", str(config))
            env = _env_with_repo()
        else:
            argv = procs.python_argv("-m", "gateway", "serve", "--config", str(config))
            env = None
        if webhooks is not None:
            from gateway.webhooks.signing import new_secret

            env = {**(env or os.environ), "GATEWAY_WEBHOOK_SECRET": new_secret()}
        svc = Service(f"gateway[{name}]", argv, port, work / "gateway.log")
        self.databases[svc.name] = db
        svc.start(work, env)
        self.stack.callback(svc.stop)
        svc.wait_ready()
        if traced is None:
            self.startups.append(svc.ready_after)
            self.gateway_loop = procs.event_loop_of(svc.pid)
        return svc

    def stop_gateway(self, svc: Service, label: str) -> None:
        svc.stop()
        self.shutdowns.append({"phase": label, "seconds": svc.stop_seconds, "exit_code": svc.exit_code})
        if svc.exit_code != 0:
            log(self.opts, f"WARNING: {svc.name} exited with {svc.exit_code}:\n{svc.log_tail()}")

    def open_streams_on_server(self, svc: Service) -> int:
        status, body = procs.http_get(svc.port, "/metrics")
        value = _metric(body, b"gateway_open_streams") if status == 200 else None
        return -1 if value is None else int(value)

    def gateway_timings(self, svc: Service) -> dict[str, tuple[float, float]]:
        """(sum, count) of the gateway's own histograms that split a delivery."""
        status, body = procs.http_get(svc.port, "/metrics")
        found: dict[str, tuple[float, float]] = {}
        if status != 200:
            return found
        for key, (name, labels) in _DELIVERY_SERIES.items():
            total, count = (_metric(body, name + suffix, labels) for suffix in (b"_sum", b"_count"))
            found[key] = (float("nan") if total is None else total, float("nan") if count is None else count)
        return found

    def wait_open_streams(self, svc: Service, want: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            seen = self.open_streams_on_server(svc)
            if seen == want or time.monotonic() > deadline:
                return seen
            time.sleep(0.1)

    def profiler(self, svc: Service, label: str, gil: bool = False) -> Any:
        if not self.opts.profile:
            return None
        from bench.pyspy import Profiler

        self.results_dir.mkdir(parents=True, exist_ok=True)
        return Profiler(svc.pid, self.results_dir / f"profile-{label}.txt", gil=gil)

    def finish_profile(self, profiler: Any, label: str) -> None:
        if profiler is not None:
            self.profiles[label] = profiler.stop()

    def create_sample(self, n: int, sample: int) -> None:
        """The `sample` sessions whose streams time delivery, on worker 0."""
        assert self.pool is not None
        r = self.pool.call({0: {"op": "create", "count": sample, "concurrency": 8, "tag": "sample"}})[0]
        if r["created"] != sample:
            raise BenchError(f"N={n}: created {r['created']} of {sample} sample sessions: {r['first_error']}")

    def open_sample(self, n: int, sample: int) -> None:
        assert self.pool is not None
        r = self.pool.call({0: {"op": "open", "concurrency": 8, "tag": "sample", "keep_data": True}})[0]
        if r["opened"] != sample:
            raise BenchError(f"N={n}: opened {r['opened']} of {sample} sample streams: {r['first_error']}")

    # phases
    def streams_phase(self, n: int) -> dict[str, Any]:
        opts, pool = self.opts, self.pool
        assert pool is not None
        largest = n == max(opts.streams)
        svc = self.start_gateway(f"streams-{n}")
        pid = svc.pid
        pool.all("target", host=HOST, port=svc.port)
        result: dict[str, Any] = {"n": n, "gateway_ready_s": svc.ready_after}
        mem: dict[str, Any] = {"fresh": procs.memory(pid)}

        sample = min(opts.sample, n)
        hold = n - sample
        workers = list(range(pool.size))
        log(opts, f"N={n}: creating {n} sessions")
        if sample:
            self.create_sample(n, sample)
        shares = split(hold, pool.size)
        per_worker = max(1, opts.create_concurrency // pool.size)
        replies = pool.call(
            {i: {"op": "create", "count": shares[i], "concurrency": per_worker, "tag": "hold"} for i in workers}
        )
        created = sum(r["created"] for r in replies.values())
        errors = sum(r["errors"] for r in replies.values())
        span = max(r["t1"] for r in replies.values()) - min(r["t0"] for r in replies.values())
        result["create"] = {
            "sessions": created + sample,
            "errors": errors,
            "first_error": next((r["first_error"] for r in replies.values() if r["first_error"]), None),
            "sessions_per_s": created / span if span > 0 else float("nan"),
        }
        if created != hold:
            raise BenchError(f"N={n}: created {created} of {hold} sessions: {result['create']['first_error']}")
        time.sleep(0.5 * opts.settle_scale)
        mem["sessions"] = procs.memory(pid)

        log(opts, f"N={n}: opening {n} streams")
        if sample:
            self.open_sample(n, sample)
        profiler = self.profiler(svc, f"open-{n}") if largest else None
        gil_profiler = self.profiler(svc, f"open-{n}-gil", gil=True) if largest else None
        per_worker = max(1, opts.open_concurrency // pool.size)
        replies = pool.call(
            {i: {"op": "open", "concurrency": per_worker, "tag": "hold", "keep_data": False} for i in workers}
        )
        self.finish_profile(profiler, f"open-{n}")
        self.finish_profile(gil_profiler, f"open-{n}-gil")
        opened = sum(r["opened"] for r in replies.values())
        span = max(r["t1"] for r in replies.values()) - min(r["t0"] for r in replies.values())
        open_ms = [t for r in replies.values() for t in r["open_ms"]]
        result["open"] = {
            "streams": opened + sample,
            "errors": sum(r["errors"] for r in replies.values()),
            "first_error": next((r["first_error"] for r in replies.values() if r["first_error"]), None),
            "seconds": span,
            "streams_per_s": opened / span if span > 0 else float("nan"),
            "connect_to_status_ms": summary(open_ms),
            "loadgen_cpu_s": sum(r["cpu_s"] for r in replies.values()),
            "loadgen_processes": pool.size,
        }
        if opened != hold:
            raise BenchError(f"N={n}: opened {opened} of {hold} streams: {result['open']['first_error']}")
        result["server_open_streams"] = self.wait_open_streams(svc, n, timeout=10)
        time.sleep(1.0 * opts.settle_scale)
        mem["streams"] = procs.memory(pid)
        result["fds"] = procs.open_fds(pid)
        result["threads"] = procs.threads(pid)
        d_rss = mem["streams"]["rss_kib"] - mem["sessions"]["rss_kib"]
        result["kib_per_stream"] = d_rss / n
        if mem["streams"]["pss_kib"] is not None and mem["sessions"]["pss_kib"] is not None:
            result["pss_kib_per_stream"] = (mem["streams"]["pss_kib"] - mem["sessions"]["pss_kib"]) / n

        # idle CPU
        log(opts, f"N={n}: idle CPU window {opts.cpu_window:.0f} s")
        hb0 = sum(r["heartbeats"] for r in pool.all("stats").values())
        profiler = self.profiler(svc, f"idle-{n}") if largest else None
        meter = procs.CpuMeter(pid)
        meter.start()
        time.sleep(opts.cpu_window)
        idle = meter.stop()
        self.finish_profile(profiler, f"idle-{n}")
        stats = pool.all("stats")
        result["idle_cpu"] = {
            **idle,
            "heartbeats_received": sum(r["heartbeats"] for r in stats.values()) - hb0,
            "heartbeat_interval_s": opts.heartbeat,
        }
        mem["after_idle"] = procs.memory(pid)

        # delivery latency on the sampled streams
        if sample:
            self.delivery(svc, n, sample, result)
        stats = pool.all("stats")
        result["holder_streams_alive_before_close"] = sum(r["alive"] for r in stats.values())

        # close, leak check
        log(opts, f"N={n}: closing streams (leak check)")
        pool.all("close")
        result["server_open_streams_after_close"] = self.wait_open_streams(svc, 0)
        time.sleep(3.0 * opts.settle_scale)  # steady state: the gateway hands freed memory back within ~2 s
        mem["closed"] = procs.memory(pid)
        cycles = []
        for _ in range(opts.leak_cycles):
            replies = pool.all("open", concurrency=per_worker, tag="hold", keep_data=False)
            reopened = sum(r["opened"] for r in replies.values())
            pool.all("close")
            self.wait_open_streams(svc, 0)
            time.sleep(3.0 * opts.settle_scale)
            cycles.append({"reopened": reopened, **procs.memory(pid)})
        mem["reopen_cycles"] = cycles
        result["memory"] = mem
        base = mem["sessions"]["rss_kib"]
        result["leak"] = {
            "rss_before_streams_kib": base,
            "rss_after_close_kib": mem["closed"]["rss_kib"],
            "delta_after_close_kib": mem["closed"]["rss_kib"] - base,
            "delta_after_cycles_kib": [c["rss_kib"] - base for c in cycles],
            "growth_per_cycle_kib": (cycles[-1]["rss_kib"] - mem["closed"]["rss_kib"]) / len(cycles)
            if cycles
            else None,
        }
        self.stop_gateway(svc, f"streams-{n}")
        return result

    def delivery(
        self,
        svc: Service,
        n: int,
        sample: int,
        result: dict[str, Any],
        floor: bool = True,
        callback_svc: Service | None = None,
    ) -> list[float]:
        """Delivery latency on worker 0's open `sample` streams, into `result`; the paced e2e values (ms).

        Three quarters of the sample 10 ms apart (an idle machine between verifications), the
        rest back to back; then (`floor`) the machine's own floor at the 10 ms pace. With
        `callback_svc` the callbacks go to that gateway, not to `svc` that holds the streams.
        """
        opts, pool = self.opts, self.pool
        assert pool is not None
        paced_e2e: list[float] = []
        paced = max(1, sample * 3 // 4)
        log(opts, f"N={n}: delivery latency on {sample} sampled streams ({paced} paced 10 ms apart)")
        for key, gap, limit in (("latency", 0.01, paced), ("latency_back_to_back", 0.0, None)):
            probe = {"op": "probe", "tag": "sample", "endpoint": self.endpoint, "gap": gap, "concurrency": 1}
            if callback_svc is not None:
                probe["callback_port"] = callback_svc.port
            before = self.gateway_timings(callback_svc or svc)
            r = pool.call({0: {**probe, "limit": limit}})[0]
            after = self.gateway_timings(callback_svc or svc)
            rows = r["rows"]
            if not rows:
                continue
            if key == "latency":
                paced_e2e = [x["e2e"] for x in rows]
            result[key] = {
                "samples": len(rows),
                "gap_s": gap,
                "errors": r["errors"],
                "first_error": r["first_error"],
                "open_streams_during": n,
                "e2e_ms": summary([x["e2e"] for x in rows]),
                "callback_answer_ms": summary([x["answer"] for x in rows]),
                "progress_event_ms": summary([x["progress"] for x in rows if x["progress"] == x["progress"]]),
                "push_lag_ms": summary([x["push_lag"] for x in rows if x["push_lag"] == x["push_lag"]]),
                # The gateway's own histograms over the same samples: where the time goes.
                "gateway_mean_ms": {
                    k: (after[k][0] - before[k][0]) * 1000 / max(after[k][1] - before[k][1], 1)
                    for k in after
                    if k in before
                },
            }
        if floor:
            count = opts.floor_samples
            rtt = pool.call({0: {"op": "floor", "path": "/healthz", "gap": 0.01, "count": count}})[0]["rtt_ms"]
            db_dir = self.databases[svc.name].parent
            result["floor_10ms_pace"] = {
                "healthz_rtt_ms": summary(rtt),
                "fdatasync_4k_ms": summary(procs.fdatasync_ms(db_dir, 0.01, count)),
            }
        return paced_e2e

    def memory_profile_phase(self, n: int) -> dict[str, Any]:
        """Where the per-stream memory goes: tracemalloc diff (source lines) and object counts."""
        opts, pool = self.opts, self.pool
        assert pool is not None
        snaps = self.tmp / "snapshots"
        snaps.mkdir(exist_ok=True)
        svc = self.start_gateway("memory-profile", traced=snaps)
        pool.all("target", host=HOST, port=svc.port)

        def snapshot(k: int) -> None:
            os.kill(svc.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 120
            while not (snaps / f"done-{k}").exists():
                if time.monotonic() > deadline:
                    raise BenchError("the traced gateway wrote no snapshot")
                time.sleep(0.1)

        log(opts, f"memory profile: N={n} streams on a gateway under tracemalloc")
        shares = split(n, pool.size)
        pool.call({i: {"op": "create", "count": shares[i], "concurrency": 16, "tag": "hold"} for i in range(pool.size)})
        time.sleep(0.5)
        snapshot(0)
        pool.call({i: {"op": "open", "concurrency": 64, "tag": "hold", "keep_data": False} for i in range(pool.size)})
        opened = self.wait_open_streams(svc, n)
        time.sleep(1.0)
        snapshot(1)
        pool.all("close")
        self.wait_open_streams(svc, 0)
        time.sleep(1.0)
        snapshot(2)
        self.stop_gateway(svc, "memory-profile")
        snap = [tracemalloc.Snapshot.load(str(snaps / f"snap-{k}.pickle")) for k in range(3)]
        types = [json.loads((snaps / f"types-{k}.json").read_text()) for k in range(3)]

        def lines(after: tracemalloc.Snapshot, before: tracemalloc.Snapshot) -> tuple[float, list[dict[str, Any]]]:
            diff = after.compare_to(before, "lineno")
            rows = [
                {
                    "where": f"{_short(d.traceback[0].filename)}:{d.traceback[0].lineno}",
                    "bytes_per_stream": d.size_diff / n,
                    "blocks_per_stream": d.count_diff / n,
                }
                for d in diff[:25]
                if d.size_diff
            ]
            return sum(d.size_diff for d in diff) / n, rows

        def objects(after: dict[str, int], before: dict[str, int]) -> list[tuple[str, float]]:
            per = sorted(
                ((k, (after.get(k, 0) - before.get(k, 0)) / n) for k in set(before) | set(after)),
                key=lambda kv: -abs(kv[1]),
            )
            return [(k, v) for k, v in per[:25] if abs(v) > 0.01]

        open_bytes, open_lines = lines(snap[1], snap[0])
        kept_bytes, kept_lines = lines(snap[2], snap[0])
        return {
            "n": n,
            "open_streams": opened,
            "traced_bytes_per_stream": open_bytes,
            "top_lines": open_lines,
            "objects_per_stream": objects(types[1], types[0]),
            "after_close": {
                "traced_bytes_per_stream": kept_bytes,
                "top_lines": kept_lines[:10],
                "objects_per_stream": objects(types[2], types[0])[:10],
            },
        }

    def throughput_phase(self) -> tuple[dict[str, Any], Service]:
        opts, pool = self.opts, self.pool
        assert pool is not None
        svc = self.start_gateway("throughput")
        flow = self.verifications(svc)
        procs_used, lanes = flow["processes"], split(opts.concurrency, flow["processes"])
        self.yardstick(flow, procs_used, lanes)
        return flow, svc

    def verifications(
        self, svc: Service, label: str = "throughput", cpu_groups: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Complete verifications/s on `svc`: --concurrency workers in 2 processes over --duration s.

        With --profile, py-spy records the gateway meanwhile as `profile-<label>[-gil].txt`.
        `cpu_groups` (name -> function listing pids) are metered over the same window, into `flow["cpu_groups"]`.
        """
        opts, pool = self.opts, self.pool
        assert pool is not None and self.fake is not None
        pid = svc.pid
        procs_used = min(2, pool.size)
        lanes = split(opts.concurrency, procs_used)
        for i in range(procs_used):
            pool.call({i: {"op": "target", "host": HOST, "port": svc.port}})
        served0 = json.loads(procs.http_get(self.fake.port, "/bench/stats")[1])["served"]
        log(opts, f"throughput: {opts.concurrency} workers, {opts.duration:.0f} s (+{opts.warmup:.0f} s warm-up)")
        start_at = time.monotonic() + 0.5
        for i in range(procs_used):
            pool.send(
                i,
                "flow",
                workers=lanes[i],
                start_at=start_at,
                warmup=opts.warmup,
                duration=opts.duration,
                endpoint=self.endpoint,
            )
        profiler = self.profiler(svc, label)
        gil_profiler = self.profiler(svc, f"{label}-gil", gil=True)
        groups = procs.GroupCpuMeter(cpu_groups) if cpu_groups else None
        cpu = self._cpu_during(pid, start_at + opts.warmup, opts.duration, also=groups)
        replies = {i: pool.recv(i) for i in range(procs_used)}
        self.finish_profile(profiler, label)
        self.finish_profile(gil_profiler, f"{label}-gil")
        served = json.loads(procs.http_get(self.fake.port, "/bench/stats")[1])["served"] - served0
        completed = sum(r["completed"] for r in replies.values())
        flow = {
            "concurrency": opts.concurrency,
            "processes": procs_used,
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "completed": completed,
            "verifications_per_s": completed / opts.duration,
            "verification_ms": summary([x for r in replies.values() for x in r["latency_ms"]]),
            "errors": sum(r["errors"] for r in replies.values()),
            "first_error": next((r["first_error"] for r in replies.values() if r["first_error"]), None),
            "gateway_cpu_pct_of_one_core": cpu["cpu_pct_of_one_core"],
            "machine_busy_pct_of_one_core": cpu["machine_busy_pct_of_one_core"],
            "loadgen_cpu_pct_of_one_core": 100 * sum(r["cpu_s"] for r in replies.values()) / opts.duration,
            "profiles_served_by_fake": served,
            "gateway_rss_kib_after": procs.rss_kib(pid),
        }
        if "groups" in cpu:
            flow["cpu_groups"] = cpu["groups"]
        return flow

    def yardstick(self, flow: dict[str, Any], procs_used: int, lanes: list[int]) -> None:
        """The same client code against a trivial Starlette JSON endpoint, into `flow`."""
        opts, pool = self.opts, self.pool
        assert pool is not None
        port = procs.free_port()
        loop = self.gateway_loop if self.gateway_loop in ("asyncio", "uvloop") else "asyncio"
        ys = Service(
            "yardstick",
            procs.python_argv("-m", "bench.yardstick", "--port", str(port), "--loop", loop),
            port,
            self.tmp / "yardstick.log",
        )
        ys.start(self.tmp, _env_with_repo())
        self.stack.callback(ys.stop)
        ys.wait_ready()
        log(opts, f"yardstick: trivial JSON endpoint, {opts.concurrency} keep-alive connections, loop={loop}")
        start_at = time.monotonic() + 0.5
        for i in range(procs_used):
            pool.send(
                i,
                "hammer",
                host=HOST,
                port=port,
                path="/json",
                workers=lanes[i],
                start_at=start_at,
                warmup=opts.warmup,
                duration=opts.duration,
            )
        cpu = self._cpu_during(ys.pid, start_at + opts.warmup, opts.duration)
        replies = {i: pool.recv(i) for i in range(procs_used)}
        rps = sum(r["completed"] for r in replies.values()) / opts.duration
        # The same endpoint with a new connection per request: the ceiling for opening streams.
        fresh_duration = min(opts.duration, 5.0)
        start_at = time.monotonic() + 0.5
        for i in range(procs_used):
            pool.send(
                i,
                "hammer",
                host=HOST,
                port=port,
                path="/json",
                workers=lanes[i],
                start_at=start_at,
                warmup=opts.warmup,
                duration=fresh_duration,
                fresh_connections=True,
            )
        fresh_cpu = self._cpu_during(ys.pid, start_at + opts.warmup, fresh_duration)
        fresh = {i: pool.recv(i) for i in range(procs_used)}
        ys.stop()
        flow["yardstick"] = {
            "requests_per_s": rps,
            "errors": sum(r["errors"] for r in replies.values()),
            "event_loop": loop,
            "server_cpu_pct_of_one_core": cpu["cpu_pct_of_one_core"],
            "machine_busy_pct_of_one_core": cpu["machine_busy_pct_of_one_core"],
            "loadgen_cpu_pct_of_one_core": 100 * sum(r["cpu_s"] for r in replies.values()) / opts.duration,
        }
        flow["yardstick_new_connection_per_request"] = {
            "requests_per_s": sum(r["completed"] for r in fresh.values()) / fresh_duration,
            "duration_s": fresh_duration,
            "errors": sum(r["errors"] for r in fresh.values()),
            "server_cpu_pct_of_one_core": fresh_cpu["cpu_pct_of_one_core"],
            "machine_busy_pct_of_one_core": fresh_cpu["machine_busy_pct_of_one_core"],
        }
        flow["ratio_to_yardstick"] = flow["verifications_per_s"] / rps if rps else float("nan")

    def profile_client_ab_phase(self) -> dict[str, Any]:
        """The lean profile client against httpx, alternating, in fresh gateways (see AB_RULE).

        Legs in ABBA order per round (lean, httpx, httpx, lean, ...), so a drift of the machine
        over the run weighs on both clients alike. Each leg: a fresh gateway (through
        bench.gateway_runner, `--profile-client lean|httpx`), AB_WARMUP unmeasured
        verifications, the paced delivery measurement on `sample` open streams, then the
        throughput measurement (with its own warm-up); the fake profile host's `User-Agent`
        count proves which client served the leg.
        """
        opts, pool = self.opts, self.pool
        assert pool is not None and self.fake is not None
        order = [c for r in range(opts.ab_rounds) for c in (AB_CLIENTS if r % 2 == 0 else AB_CLIENTS[::-1])]
        sample = max(opts.sample, 4)
        legs: list[dict[str, Any]] = []
        paced: dict[str, list[float]] = {c: [] for c in AB_CLIENTS}
        for k, client in enumerate(order, 1):
            log(opts, f"profile client A/B, leg {k} of {len(order)}: {client}")
            stats0 = json.loads(procs.http_get(self.fake.port, "/bench/stats")[1])
            svc = self.start_gateway(f"ab-{k}-{client}", profile_client=client)
            delivery, e2e, flow = self._ab_leg(svc, f"ab-{k}-{client}", sample)
            paced[client] += e2e
            self.stop_gateway(svc, f"ab-{k}-{client}")
            stats1 = json.loads(procs.http_get(self.fake.port, "/bench/stats")[1])
            served = stats1["served"] - stats0["served"]
            by_httpx = stats1["served_httpx"] - stats0["served_httpx"]
            if served == 0 or by_httpx != (served if client == "httpx" else 0):
                raise BenchError(f"A/B leg {k} ({client}): {by_httpx} of {served} profiles were fetched by httpx")
            legs.append(
                {
                    "leg": k,
                    "client": client,
                    "profiles_served": served,
                    "served_by_httpx": by_httpx,
                    "gateway_exit_code": svc.exit_code,
                    "delivery": delivery,
                    "throughput": flow,
                }
            )
        clients = {c: _ab_client([leg for leg in legs if leg["client"] == c], paced[c]) for c in AB_CLIENTS}
        lean, httpx = clients["lean"], clients["httpx"]
        ratio = {
            "verifications_per_s": httpx["verifications_per_s"] / lean["verifications_per_s"],
            "delivery_p50": httpx["delivery_ms"]["p50"] / lean["delivery_ms"]["p50"],
            "delivery_p99": httpx["delivery_ms"]["p99"] / lean["delivery_ms"]["p99"],
        }
        return {
            "rounds": opts.ab_rounds,
            "order": order,
            "sample": sample,
            "legs": legs,
            "clients": clients,
            "ratio_httpx_to_lean": ratio,
            "rule": AB_RULE,
            "httpx_within_15pct": ratio["verifications_per_s"] >= 1 - AB_MARGIN
            and ratio["delivery_p50"] <= 1 + AB_MARGIN,
        }

    def _ab_leg(self, svc: Service, label: str, sample: int) -> tuple[dict[str, Any], list[float], dict[str, Any]]:
        """One A/B leg on a fresh gateway: warm-up, paced delivery, then throughput."""
        pool = self.pool
        assert pool is not None
        pool.all("target", host=HOST, port=svc.port)
        opened = sample + AB_WARMUP
        self.create_sample(opened, opened)
        self.open_sample(opened, opened)
        # Unmeasured: a process's first profile fetch imports and connects.
        warmup = {"op": "probe", "tag": "sample", "endpoint": self.endpoint, "gap": 0.0, "concurrency": 1}
        warm = pool.call({0: {**warmup, "limit": AB_WARMUP}})[0]
        if warm["errors"] or len(warm["rows"]) != AB_WARMUP:
            raise BenchError(f"A/B leg {label}: warm-up failed: {warm['first_error']}")
        delivery: dict[str, Any] = {}
        e2e = self.delivery(svc, sample, sample, delivery, floor=False)
        return delivery, e2e, self.verifications(svc, label)

    def webhooks_ab_phase(self) -> dict[str, Any]:
        """Webhooks off against on (a slow receiver), alternating in fresh gateways, same legs as above.

        On an "on" leg, after the throughput window, the outbox is waited for until every
        outcome's webhook reached the receiver: the backlog a burst leaves and how long it takes.
        """
        opts = self.opts
        port = procs.free_port()
        receiver = Service(
            "webhook-receiver",
            procs.python_argv(
                "-m", "bench.webhook_receiver", "--port", str(port), "--delay-ms", str(WEBHOOK_RECEIVER_DELAY_MS)
            ),
            port,
            self.tmp / "receiver.log",
        )
        receiver.start(self.tmp, _env_with_repo())
        self.stack.callback(receiver.stop)
        receiver.wait_ready()
        order = [m for r in range(opts.ab_rounds) for m in (WEBHOOK_MODES if r % 2 == 0 else WEBHOOK_MODES[::-1])]
        sample = max(opts.sample, 4)
        legs: list[dict[str, Any]] = []
        paced: dict[str, list[float]] = {m: [] for m in WEBHOOK_MODES}
        for k, mode in enumerate(order, 1):
            log(opts, f"webhooks A/B, leg {k} of {len(order)}: {mode}")
            label = f"wh-{k}-{mode}"
            before = json.loads(procs.http_get(port, "/stats")[1])
            url = f"http://{HOST}:{port}/hook" if mode == "on" else None
            svc = self.start_gateway(label, webhooks=url)
            delivery, e2e, flow = self._ab_leg(svc, label, sample)
            paced[mode] += e2e
            leg: dict[str, Any] = {"leg": k, "mode": mode, "delivery": delivery, "throughput": flow}
            if mode == "on":
                leg["webhooks"] = self._drain(svc, port, before)
            self.stop_gateway(svc, label)
            legs.append(leg)
        modes = {m: _ab_client([leg for leg in legs if leg["mode"] == m], paced[m]) for m in WEBHOOK_MODES}
        off, on = modes["off"], modes["on"]
        return {
            "rounds": opts.ab_rounds,
            "order": order,
            "sample": sample,
            "receiver_delay_ms": WEBHOOK_RECEIVER_DELAY_MS,
            "legs": legs,
            "modes": modes,
            "ratio_on_to_off": {
                "verifications_per_s": on["verifications_per_s"] / off["verifications_per_s"],
                "delivery_p50": on["delivery_ms"]["p50"] / off["delivery_ms"]["p50"],
                "delivery_p99": on["delivery_ms"]["p99"] / off["delivery_ms"]["p99"],
            },
            "all_delivered": all(leg["webhooks"]["all_delivered"] for leg in legs if leg["mode"] == "on"),
        }

    def limits_ab_phase(self) -> dict[str, Any]:
        """[limits] off against on (LIMITS_ON), alternating in fresh gateways, same legs as the other A/Bs.

        Every leg must finish without a refusal: gateway_limited_total stays 0.
        """
        opts = self.opts
        order = [m for r in range(opts.ab_rounds) for m in (LIMIT_MODES if r % 2 == 0 else LIMIT_MODES[::-1])]
        sample = max(opts.sample, 4)
        legs: list[dict[str, Any]] = []
        paced: dict[str, list[float]] = {m: [] for m in LIMIT_MODES}
        for k, mode in enumerate(order, 1):
            log(opts, f"limits A/B, leg {k} of {len(order)}: {mode}")
            label = f"limits-{k}-{mode}"
            svc = self.start_gateway(label, limits=mode)
            delivery, e2e, flow = self._ab_leg(svc, label, sample)
            paced[mode] += e2e
            _, body = procs.http_get(svc.port, "/metrics")
            refused = sum(
                float(line.rsplit(" ", 1)[1])
                for line in body.decode().splitlines()
                if line.startswith("gateway_limited_total{")
            )
            self.stop_gateway(svc, label)
            legs.append({"leg": k, "mode": mode, "delivery": delivery, "throughput": flow, "refused": int(refused)})
        modes = {m: _ab_client([leg for leg in legs if leg["mode"] == m], paced[m]) for m in LIMIT_MODES}
        off, on = modes["off"], modes["on"]
        return {
            "rounds": opts.ab_rounds,
            "order": order,
            "sample": sample,
            "legs": legs,
            "modes": modes,
            "ratio_on_to_off": {
                "verifications_per_s": on["verifications_per_s"] / off["verifications_per_s"],
                "delivery_p50": on["delivery_ms"]["p50"] / off["delivery_ms"]["p50"],
                "delivery_p99": on["delivery_ms"]["p99"] / off["delivery_ms"]["p99"],
            },
            "none_refused": all(leg["refused"] == 0 for leg in legs),
        }

    def _drain(self, svc: Service, receiver_port: int, before: dict[str, int]) -> dict[str, Any]:
        """Wait until the receiver got one webhook per outcome of this gateway; how long, how many."""
        _, body = procs.http_get(svc.port, "/metrics")
        lines = body.decode().splitlines()
        outcomes = sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("gateway_outcomes_total{"))
        started = time.monotonic()
        got: dict[str, int] = before
        while time.monotonic() - started < WEBHOOK_DRAIN_TIMEOUT:
            got = json.loads(procs.http_get(receiver_port, "/stats")[1])
            if got["distinct"] - before["distinct"] >= outcomes:
                break
            time.sleep(0.1)
        distinct = got["distinct"] - before["distinct"]
        return {
            "outcomes": int(outcomes),
            "received": got["received"] - before["received"],
            "distinct": distinct,
            "drain_after_window_s": time.monotonic() - started,
            "all_delivered": distinct >= outcomes,
        }

    def reconnect_storm_phase(self) -> dict[str, Any]:
        """N streams open, SIGTERM and a new gateway on the same port and database; the clients
        come back like EventSource (after the `retry` they were sent). Reconnect attempts per
        100 ms, with the closes at once and no retry jitter ("before"), then spread ("after")."""
        opts, pool = self.opts, self.pool
        assert pool is not None
        n = max(opts.streams)
        variants = [
            ("before: closed at once, retry 3000", 0.0, 0),
            ("after: shutdown_spread 2 s", 2.0, 0),
            ("after: shutdown_spread 2 s, retry_jitter 2000 ms", 2.0, 2000),
        ]
        runs = []
        for label, spread, jitter in variants:
            log(opts, f"reconnect storm: {label}, {n} streams")
            name = f"storm-{len(runs) + 1}"
            server = f"shutdown_spread = {spread}\nshutdown_timeout = 8.0\n"
            stream = f"retry_jitter = {jitter}\n"
            first = self.start_gateway(name, server_extra=server, stream_extra=stream)
            db = self.databases[first.name]
            pool.all("target", host=HOST, port=first.port)
            shares = split(n, pool.size)
            per = max(1, opts.create_concurrency // pool.size)
            pool.call(
                {i: {"op": "create", "count": shares[i], "concurrency": per, "tag": "storm"} for i in range(pool.size)}
            )
            per_open = max(1, opts.open_concurrency // pool.size)
            opened = pool.call(
                {
                    i: {"op": "open", "concurrency": per_open, "tag": "storm", "keep_data": False}
                    for i in range(pool.size)
                }
            )
            total = sum(r["opened"] for r in opened.values())
            for i in range(pool.size):
                pool.send(i, "storm", tag="storm", within=60.0)
            stopped_at = time.time()
            self.stop_gateway(first, name)
            second = self.start_gateway(
                name + "-restart", db=db, port=first.port, server_extra=server, stream_extra=stream
            )
            replies = {i: pool.recv(i, timeout=120) for i in range(pool.size)}
            attempts = sorted(t - stopped_at for r in replies.values() for t in r["attempts"])
            buckets: dict[int, int] = {}
            for t in attempts:
                buckets[int(t * 10)] = buckets.get(int(t * 10), 0) + 1
            runs.append(
                {
                    "variant": label,
                    "streams": total,
                    "reconnected": sum(r["reconnected"] for r in replies.values()),
                    "attempts": len(attempts),
                    "peak_per_100ms": max(buckets.values(), default=0),
                    "spread_p5_p95_s": [pct(attempts, 5), pct(attempts, 95)] if attempts else None,
                    "restart_ready_s": second.ready_after,
                }
            )
            self.stop_gateway(second, name + "-restart")
            pool.all("close")
        return {"n": n, "runs": runs}

    def _cpu_during(
        self, pid: int, start: float, duration: float, also: procs.GroupCpuMeter | None = None
    ) -> dict[str, Any]:
        time.sleep(max(0.0, start - time.monotonic()))
        meter = procs.CpuMeter(pid)
        meter.start()
        if also is not None:
            also.start()
        time.sleep(max(0.0, start + duration - time.monotonic()))
        used: dict[str, Any] = dict(meter.stop())
        if also is not None:
            used["groups"] = also.stop()
        return used

    def polling_phase(self, svc: Service) -> dict[str, Any]:
        opts, pool = self.opts, self.pool
        assert pool is not None
        log(opts, f"polling vs SSE: {opts.poll_sessions} sessions each, poll every {opts.poll_interval} s")
        poll_worker = 1 if pool.size > 1 else 0
        for i in {0, poll_worker}:
            pool.call({i: {"op": "target", "host": HOST, "port": svc.port}})
        args = {
            "sessions": opts.poll_sessions,
            "interval": opts.poll_interval,
            "offset_max": opts.poll_offset_max,
            "endpoint": self.endpoint,
        }
        if poll_worker:
            replies = pool.call(
                {0: {"op": "polling", "mode": "sse", **args}, poll_worker: {"op": "polling", "mode": "poll", **args}},
                timeout=300,
            )
            sse, poll = replies[0], replies[poll_worker]
        else:
            sse = pool.call({0: {"op": "polling", "mode": "sse", **args}}, timeout=300)[0]
            poll = pool.call({0: {"op": "polling", "mode": "poll", **args}}, timeout=300)[0]

        def digest(r: dict[str, Any]) -> dict[str, Any]:
            rows = r["rows"]
            return {
                "verifications": len(rows),
                "errors": r["errors"],
                "first_error": r["first_error"],
                "time_to_outcome_ms": summary([x["time_to_outcome_ms"] for x in rows]),
                "since_start_ms": summary([x["since_start_ms"] for x in rows]),
                "requests_per_verification": statistics.fmean(x["requests"] for x in rows) if rows else float("nan"),
                "bytes_in_per_verification": statistics.fmean(x["bytes_in"] for x in rows) if rows else float("nan"),
            }

        return {
            "sessions": opts.poll_sessions,
            "interval_s": opts.poll_interval,
            "callback_offset_max_s": opts.poll_offset_max,
            "poll": digest(poll),
            "sse": digest(sse),
        }

    def restart_phase(self, svc: Service) -> dict[str, Any]:
        db = self.databases[svc.name]
        self.stop_gateway(svc, "throughput")
        with contextlib.closing(sqlite3.connect(db)) as conn:
            sessions = conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
        again = self.start_gateway("restart", db=db)
        self.startups.pop()  # a restart is reported on its own
        ready = again.ready_after
        self.stop_gateway(again, "restart")
        return {"ready_s": ready, "sessions_in_db": sessions}

    def run(self) -> dict[str, Any]:
        opts = self.opts
        started = time.time()
        t0 = time.monotonic()
        load_at_start = os.getloadavg()
        only_ab = set(opts.phases) <= {"profile-client-ab", "webhooks-ab", "limits-ab", "reconnect-storm", "scaleout"}
        with_streams = not only_ab or bool({"reconnect-storm", "scaleout"} & set(opts.phases))
        largest = max(opts.streams) if opts.streams and with_streams else 0
        size = max(2, math.ceil(largest / opts.max_per_process))
        log(opts, f"starting the fake profile host and {size} load-generator processes")
        self.fake = self.start_fake()
        self.pool = Pool(size)
        self.stack.callback(self.pool.close)
        results: dict[str, Any] = {"meta": {}, "streams": []}
        if "streams" in opts.phases:
            for n in opts.streams:
                results["streams"].append(self.streams_phase(n))
        if opts.memory_profile and largest:
            results["memory_profile"] = self.memory_profile_phase(largest)
        if not only_ab:
            if "throughput" in opts.phases:
                flow, svc = self.throughput_phase()
                results["throughput"] = flow
            else:
                svc = self.start_gateway("throughput")
            if "polling" in opts.phases:
                results["polling"] = self.polling_phase(svc)
            restart = self.restart_phase(svc)
        if "profile-client-ab" in opts.phases:
            results["profile_client_ab"] = self.profile_client_ab_phase()
        if "webhooks-ab" in opts.phases:
            results["webhooks_ab"] = self.webhooks_ab_phase()
        if "limits-ab" in opts.phases:
            results["limits_ab"] = self.limits_ab_phase()
        if "reconnect-storm" in opts.phases:
            results["reconnect_storm"] = self.reconnect_storm_phase()
        if "scaleout" in opts.phases:
            from bench.scaleout import scaleout_phase

            results["scaleout"] = scaleout_phase(self)
        if not only_ab:
            results["startup"] = {
                "fresh_ready_s": self.startups,
                "fresh_ready_median_s": statistics.median(self.startups),
                "fresh_ready_max_s": max(self.startups),
                "restart_ready_s": restart["ready_s"],
                "restart_sessions_in_db": restart["sessions_in_db"],
                "shutdowns": self.shutdowns,
            }
        if self.profiles:
            results["profiles"] = self.profiles
        results["meta"] = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "elapsed_s": time.monotonic() - t0,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
            "machine": procs.machine(),
            "gateway_event_loop": self.gateway_loop,
            "loadgen_processes": size,
            "loadavg_at_start": load_at_start,
            "gateway_switch_interval_s": opts.switch_interval,
        }
        from bench.report import evaluate_targets

        results["targets"] = evaluate_targets(results)
        return results


def _ab_client(legs: list[dict[str, Any]], paced_e2e: list[float]) -> dict[str, Any]:
    """One client's numbers over its A/B legs: mean verifications/s, delivery over every paced sample."""
    rates = [leg["throughput"]["verifications_per_s"] for leg in legs]
    fetch = [leg["delivery"]["latency"]["gateway_mean_ms"].get("profile_fetch", float("nan")) for leg in legs]
    return {
        "legs": len(legs),
        "verifications_per_s": statistics.fmean(rates),
        "verifications_per_s_legs": rates,
        "verification_errors": sum(leg["throughput"]["errors"] for leg in legs),
        "delivery_ms": summary(paced_e2e),
        "delivery_p50_legs_ms": [leg["delivery"]["latency"]["e2e_ms"]["p50"] for leg in legs],
        "delivery_p99_legs_ms": [leg["delivery"]["latency"]["e2e_ms"]["p99"] for leg in legs],
        "delivery_errors": sum(leg["delivery"]["latency"]["errors"] for leg in legs),
        "profile_fetch_mean_ms": statistics.fmean(fetch),
    }


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3", str(REPO) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(opts: Options) -> dict[str, Any]:
    """Run every phase; every process started is stopped again, also on errors and Ctrl+C."""
    raise_nofile_limit()
    with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-bench-")))
        results = Bench(opts, tmp, stack).run()
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results
