"""Load-generator worker processes (multiprocessing, spawn), driven by commands over a pipe.

Each worker runs one event loop (uvloop when installed) and keeps state between commands:
the sessions it created and the streams it holds open. The orchestrator sends a command to
several workers at once and collects their replies, so work is spread across processes
(each process stays below ~4,000 connections and the 20,000 open-file limit).

Commands are dicts with an `op`; replies are dicts (`{"error": ...}` on failure).
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench.client import Conn, connect
from bench.fake_profile import bench_token

CALLBACK_PATH = "/v1/callbacks/truecaller"


@dataclass(slots=True)
class Session:
    id: str
    nonce: str
    digits: str  # the phone number without "+"; the bench token carries the same digits
    tag: str
    stream: Conn | None = None


def raise_nofile_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _bounded(jobs: list[Callable[[], Awaitable[Any]]], concurrency: int) -> list[Any]:
    """Run the jobs with at most `concurrency` in flight; results (or exceptions) in order."""
    results: list[Any] = [None] * len(jobs)
    it = iter(range(len(jobs)))

    async def lane() -> None:
        for i in it:
            try:
                results[i] = await jobs[i]()
            except Exception as exc:
                results[i] = exc

    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, len(jobs))))))
    return results


def _first_error(results: list[Any]) -> str | None:
    for r in results:
        if isinstance(r, BaseException):
            return f"{type(r).__name__}: {r}"
    return None


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.host = "127.0.0.1"
        self.port = 0
        self.sessions: list[Session] = []
        self.counter = 0
        self.rng = random.Random(index)

    # -- helpers ----------------------------------------------------------------------------
    def _digits(self) -> str:
        self.counter += 1
        # +91 98 <worker:2> <counter:6>: a possible Indian mobile number, unique per session
        return f"9198{self.index % 100:02d}{self.counter % 1_000_000:06d}"

    async def _conn(self, keep_data: bool = True) -> Conn:
        return await connect(self.host, self.port, keep_data=keep_data)

    async def _create(self, http: Conn, tag: str) -> Session:
        digits = self._digits()
        r = await http.post_json("/v1/sessions", {"provider": "truecaller", "phone": "+" + digits})
        if r.status != 201:
            raise RuntimeError(f"create session: HTTP {r.status} {r.body[:200]!r}")
        body = r.json()
        return Session(body["id"], body["truecaller"]["request_nonce"], digits, tag)

    async def _callback(self, http: Conn, session: Session, endpoint: str) -> None:
        payload = {"requestId": session.nonce, "accessToken": bench_token(session.digits), "endpoint": endpoint}
        r = await http.post_json(CALLBACK_PATH, payload)
        if r.status != 200:
            raise RuntimeError(f"callback: HTTP {r.status} {r.body[:200]!r}")

    # -- commands ---------------------------------------------------------------------------
    async def op_target(self, host: str, port: int) -> dict[str, Any]:
        """Point at a (new) gateway; forgets sessions and closes streams of the old one."""
        await self.op_close()
        self.host, self.port = host, port
        self.sessions = []
        return {"ok": True}

    async def op_create(self, count: int, concurrency: int, tag: str) -> dict[str, Any]:
        lanes = max(1, min(concurrency, count))
        conns = [await self._conn() for _ in range(lanes)]
        created: list[Session] = []
        errors = 0
        first_error: str | None = None
        t0 = time.monotonic()
        todo = iter(range(count))

        async def lane(http: Conn) -> None:
            nonlocal errors, first_error
            for _ in todo:
                try:
                    if http.closed:
                        http = await self._conn()
                    created.append(await self._create(http, tag))
                except Exception as exc:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"

        await asyncio.gather(*(lane(c) for c in conns))
        t1 = time.monotonic()
        for c in conns:
            c.close()
        self.sessions += created
        return {"created": len(created), "errors": errors, "first_error": first_error, "t0": t0, "t1": t1}

    async def op_open(self, concurrency: int, tag: str, keep_data: bool) -> dict[str, Any]:
        """Open one stream per session with this tag that has none; wait for each `status` event."""
        todo = [s for s in self.sessions if s.tag == tag and (s.stream is None or s.stream.closed)]
        cpu0 = cpu_seconds()

        def job(s: Session) -> Callable[[], Awaitable[float]]:
            async def run() -> float:
                started = time.monotonic()
                conn = await self._conn(keep_data)
                s.stream = conn
                conn.start_stream(f"/v1/sessions/{s.id}/events")
                arrived = await conn.wait_event("status", timeout=60)
                return arrived - started

            return run

        t0 = time.monotonic()
        results = await _bounded([job(s) for s in todo], concurrency)
        t1 = time.monotonic()
        times = [r for r in results if isinstance(r, float)]
        return {
            "opened": len(times),
            "errors": len(results) - len(times),
            "first_error": _first_error(results),
            "t0": t0,
            "t1": t1,
            "open_ms": [t * 1000 for t in times],
            "cpu_s": cpu_seconds() - cpu0,
        }

    async def op_storm(self, tag: str, within: float) -> dict[str, Any]:
        """Behave like EventSource after a restart: when a stream of `tag` ends, wait the `retry`
        it was sent, reconnect, and again after each failed attempt; every attempt's wall time."""
        attempts: list[float] = []
        done = 0
        end = time.monotonic() + within

        async def one(s: Session) -> None:
            nonlocal done
            assert s.stream is not None
            retry = (s.stream.retry_ms or 3000) / 1000
            await s.stream.wait_stream_end(timeout=within)
            while time.monotonic() < end:
                await asyncio.sleep(retry)
                attempts.append(time.time())
                try:
                    conn = await self._conn(keep_data=False)
                    conn.start_stream(f"/v1/sessions/{s.id}/events")
                    await conn.wait_event("status", timeout=10)
                except Exception:  # refused while the gateway restarts: try again after `retry`
                    continue
                s.stream = conn
                done += 1
                return

        todo = [s for s in self.sessions if s.tag == tag and s.stream is not None]
        results = await asyncio.gather(*(one(s) for s in todo), return_exceptions=True)
        return {"streams": len(todo), "reconnected": done, "attempts": attempts, "first_error": _first_error(results)}

    async def op_stats(self) -> dict[str, Any]:
        streams = [s.stream for s in self.sessions if s.stream is not None]
        alive = [c for c in streams if not c.closed and not c.stream_ended]
        return {
            "streams": len(streams),
            "alive": len(alive),
            "ended": sum(1 for c in streams if c.stream_ended),
            "closed": sum(1 for c in streams if c.closed),
            "heartbeats": sum(c.heartbeats for c in streams),
            "close_reasons": sorted({c.close_reason for c in streams if c.closed})[:5],
        }

    async def op_close(self) -> dict[str, Any]:
        n = 0
        for s in self.sessions:
            if s.stream is not None:
                if not s.stream.closed:
                    n += 1
                s.stream.close()
                s.stream = None
        await asyncio.sleep(0)
        return {"closed": n}

    async def op_floor(self, path: str, gap: float, count: int) -> dict[str, Any]:
        """`count` sequential GETs of `path`, `gap` s apart: this machine's round trip at that pace."""
        http = await self._conn()
        times: list[float] = []
        try:
            for _ in range(count):
                t0 = time.monotonic()
                await http.request("GET", path)
                times.append((time.monotonic() - t0) * 1000)
                await asyncio.sleep(gap)
        finally:
            http.close()
        return {"rtt_ms": times}

    async def op_probe(
        self,
        tag: str,
        endpoint: str,
        gap: float,
        concurrency: int,
        limit: int | None = None,
        callback_port: int | None = None,
    ) -> dict[str, Any]:
        """For each open stream with this tag: send the token callback, time the events on that stream.

        With `callback_port` the callbacks go to that gateway instead of the one holding the
        streams (two instances on one database: the outcome crosses over to the stream's holder).
        """
        targets = [
            s
            for s in self.sessions
            if s.tag == tag and s.stream is not None and not s.stream.closed and "outcome" not in s.stream.event_times
        ]
        targets = targets[:limit] if limit is not None else targets
        rows: list[dict[str, float]] = []
        errors = 0
        first_error: str | None = None
        todo = iter(targets)

        async def callback_conn() -> Conn:
            if callback_port is None:
                return await self._conn()
            return await connect(self.host, callback_port)

        async def lane() -> None:
            nonlocal errors, first_error
            http = await callback_conn()
            try:
                for s in todo:
                    stream = s.stream
                    assert stream is not None
                    try:
                        if http.closed:
                            http = await callback_conn()
                        t0 = time.monotonic()
                        await self._callback(http, s, endpoint)
                        answered = time.monotonic()
                        t_out = await stream.wait_event("outcome", timeout=30)
                        t_prog = stream.event_times.get("progress", float("nan"))
                        rows.append(
                            {
                                "e2e": (t_out - t0) * 1000,
                                "answer": (answered - t0) * 1000,
                                "progress": (t_prog - t0) * 1000,
                                "push_lag": (t_prog - answered) * 1000,
                            }
                        )
                        if b'"status":"verified"' not in stream.event_data.get("outcome", b""):
                            raise RuntimeError(f"outcome is not verified: {stream.event_data.get('outcome')!r}")
                    except Exception as exc:
                        errors += 1
                        first_error = first_error or f"{type(exc).__name__}: {exc}"
                    if gap:
                        await asyncio.sleep(gap)
            finally:
                http.close()

        await asyncio.gather(*(lane() for _ in range(max(1, concurrency))))
        return {"rows": rows, "errors": errors, "first_error": first_error}

    async def op_flow(
        self, workers: int, start_at: float, warmup: float, duration: float, endpoint: str
    ) -> dict[str, Any]:
        """Complete verifications in a loop: create → stream (status) → callback → outcome."""
        measure_from = start_at + warmup
        end = measure_from + duration
        latencies: list[float] = []
        errors = 0
        first_error: str | None = None
        cpu: list[float] = []

        async def lane() -> None:
            nonlocal errors, first_error
            http = await self._conn()
            stream = await self._conn()
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            while True:
                t0 = time.monotonic()
                if t0 >= end:
                    break
                try:
                    if http.closed:
                        http = await self._conn()
                    if not stream.idle:
                        stream.close()
                        stream = await self._conn()
                    s = await self._create(http, "flow")
                    stream.start_stream(f"/v1/sessions/{s.id}/events")
                    await stream.wait_event("status")
                    await self._callback(http, s, endpoint)
                    await stream.wait_event("outcome")
                    await stream.wait_stream_end()
                    t1 = time.monotonic()
                    if b'"status":"verified"' not in stream.event_data.get("outcome", b""):
                        raise RuntimeError(f"outcome is not verified: {stream.event_data.get('outcome')!r}")
                    if t0 >= measure_from and t1 <= end:
                        latencies.append((t1 - t0) * 1000)
                except Exception as exc:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"
                    await asyncio.sleep(0.01)
            http.close()
            stream.close()

        async def meter() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
            cpu.append(cpu_seconds())
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            cpu.append(cpu_seconds())

        await asyncio.gather(meter(), *(lane() for _ in range(workers)))
        return {
            "completed": len(latencies),
            "latency_ms": latencies,
            "errors": errors,
            "first_error": first_error,
            "cpu_s": cpu[1] - cpu[0] if len(cpu) == 2 else float("nan"),
        }

    async def op_hammer(
        self,
        host: str,
        port: int,
        path: str,
        workers: int,
        start_at: float,
        warmup: float,
        duration: float,
        fresh_connections: bool = False,
    ) -> dict[str, Any]:
        """GET `path` in a loop on `workers` lanes; count answers in the window.

        Keep-alive by default; with `fresh_connections` every request opens (and then closes)
        its own connection, the way every new event stream does.
        """
        measure_from = start_at + warmup
        end = measure_from + duration
        counts = [0] * workers
        errors = 0
        first_error: str | None = None
        cpu: list[float] = []

        async def lane(i: int) -> None:
            nonlocal errors, first_error
            http = await connect(host, port)
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            while True:
                t0 = time.monotonic()
                if t0 >= end:
                    break
                try:
                    if http.closed or fresh_connections:
                        http.close()
                        http = await connect(host, port)
                    r = await http.request("GET", path)
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}")
                    if t0 >= measure_from and time.monotonic() <= end:
                        counts[i] += 1
                except Exception as exc:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"
                    await asyncio.sleep(0.01)
            http.close()

        async def meter() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
            cpu.append(cpu_seconds())
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            cpu.append(cpu_seconds())

        await asyncio.gather(meter(), *(lane(i) for i in range(workers)))
        return {
            "completed": sum(counts),
            "errors": errors,
            "first_error": first_error,
            "cpu_s": cpu[1] - cpu[0] if len(cpu) == 2 else float("nan"),
        }

    async def op_polling(
        self, sessions: int, interval: float, offset_max: float, endpoint: str, mode: str
    ) -> dict[str, Any]:
        """`sessions` concurrent verifications whose callback comes at a random offset after the start.

        mode "poll": the client reads `GET /v1/sessions/{id}` every `interval` s (first read one
        interval after the start) until the session is terminal. mode "sse": the client holds
        the event stream. Time to outcome is measured from the callback being sent.
        """

        async def one() -> dict[str, float]:
            http = await self._conn()
            provider = await self._conn()
            try:
                s = await self._create(http, "polling")
                started = time.monotonic()
                offset = self.rng.uniform(0, offset_max)
                stream: Conn | None = None
                if mode == "sse":
                    stream = await self._conn()
                    stream.start_stream(f"/v1/sessions/{s.id}/events")
                    await stream.wait_event("status")

                async def callback() -> float:
                    await asyncio.sleep(max(0.0, started + offset - time.monotonic()))
                    sent = time.monotonic()
                    await self._callback(provider, s, endpoint)
                    return sent

                cb = asyncio.ensure_future(callback())
                polls = 0
                if stream is not None:
                    seen = await stream.wait_event("outcome", timeout=60)
                    await stream.wait_stream_end()
                    received = stream.bytes_in
                    stream.close()
                    requests = 2  # create + one stream
                else:
                    k = 1
                    while True:
                        await asyncio.sleep(max(0.0, started + k * interval - time.monotonic()))
                        r = await http.request("GET", f"/v1/sessions/{s.id}")
                        polls += 1
                        if r.status != 200:
                            raise RuntimeError(f"poll: HTTP {r.status}")
                        if r.json()["status"] != "pending":
                            seen = time.monotonic()
                            break
                        k += 1
                    received = http.bytes_in
                    requests = 1 + polls
                sent = await cb
                return {
                    "time_to_outcome_ms": (seen - sent) * 1000,
                    "since_start_ms": (seen - started) * 1000,
                    "offset_ms": offset * 1000,
                    "requests": requests,
                    "polls": polls,
                    "bytes_in": received,
                }
            finally:
                http.close()
                provider.close()

        results = await asyncio.gather(*(one() for _ in range(sessions)), return_exceptions=True)
        rows = [r for r in results if isinstance(r, dict)]
        return {"rows": rows, "errors": len(results) - len(rows), "first_error": _first_error(list(results))}


async def _serve(pipe: Connection, index: int) -> None:
    worker = Worker(index)
    loop = asyncio.get_running_loop()
    while True:
        command: dict[str, Any] = await loop.run_in_executor(None, pipe.recv)
        op = command.pop("op")
        if op == "exit":
            await worker.op_close()
            pipe.send({"ok": True})
            return
        try:
            handler = getattr(worker, f"op_{op}")
            reply = await handler(**command)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        pipe.send(reply)


def worker_main(pipe: Connection, index: int) -> None:
    """Entry point of a spawned worker process."""
    raise_nofile_limit()
    try:
        import uvloop

        uvloop.run(_serve(pipe, index))
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        asyncio.run(_serve(pipe, index))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    finally:
        os._exit(0)
