"""No reconnect storms: a jittered `retry:` (stream.retry_jitter) and, on SIGTERM, stream closes
spread over server.shutdown_spread, so browsers told to come back do not all come back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.broker import Broker
from tests.test_shutdown import gateway_process
from tests.utils import RawStream, Running, _serve, listening_socket, make_settings, parse_sse

pytestmark = pytest.mark.timeout(30)

STREAMS = 200


async def test_close_all_spreads_closes_and_a_later_call_closes_the_rest_now() -> None:
    broker = Broker()
    subs = [broker.subscribe(f"s{i}") for i in range(4)]
    moments = iter([0.0, 0.25, 0.5, 1.0])
    broker.close_all("shutdown", spread=0.2, rng=lambda: next(moments))
    assert broker.subscribe("late").close_reason == "shutdown"  # refused at once
    async with asyncio.timeout(2):
        while subs[0].close_reason is None:  # its moment is 0 s: the next turn of the loop
            await asyncio.sleep(0)
    assert subs[3].close_reason is None  # 0.2 s away
    async with asyncio.timeout(2):
        while subs[2].close_reason is None:
            await asyncio.sleep(0.01)
    assert subs[3].close_reason is None  # its moment (0.2 s) has not come
    broker.close_all("stopped")
    assert subs[3].close_reason == "stopped" and broker.count() == 0


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, **overrides: object) -> AsyncIterator[Running]:
    settings = make_settings(tmp_path / "g.db", overrides)
    async with _serve(settings, listening_socket()) as running:
        yield running


async def first_retry(client: httpx.AsyncClient, stream_url: str) -> int:
    """Open a stream, read its first event (the status, which carries `retry:`), close it."""
    async with client.stream("GET", stream_url) as response:
        first = parse_sse(await RawStream(response).until(b"event: status"))
    return int(first[0]["retry"])


@pytest.mark.parametrize("jitter", [0, 2000])
async def test_each_stream_gets_retry_plus_a_uniform_share_of_the_jitter(tmp_path: Path, jitter: int) -> None:
    async with (
        gateway(tmp_path, stream={"retry": 3000, "retry_jitter": jitter}) as running,
        running.client(limits=httpx.Limits(max_connections=50)) as client,
    ):
        stream_url = (await client.post("/v1/sessions", json={"provider": "truecaller"})).json()["stream_url"]
        retries = await asyncio.gather(*(first_retry(client, stream_url) for _ in range(STREAMS)))
    if jitter == 0:
        assert set(retries) == {3000}  # off: exactly stream.retry, as the contract says
        return
    assert all(3000 <= r <= 5000 for r in retries)
    # Uniform over the window: each quarter holds a fair share (25 % expected, 12.5 % is > 5 sigma
    # away for 200 draws), and the mean sits near the middle.
    quarters = Counter(min((r - 3000) * 4 // jitter, 3) for r in retries)
    assert all(quarters[q] >= STREAMS // 8 for q in range(4)), quarters
    assert abs(statistics.mean(retries) - 4000) < 200
    assert len(set(retries)) > STREAMS // 2  # not a handful of values


@pytest.mark.parametrize("spread", [0.0, 1.0])
async def test_sigterm_closes_streams_across_the_spread_and_exits_zero_in_time(tmp_path: Path, spread: float) -> None:
    """A real `gateway serve` with 200 open streams gets SIGTERM: with a spread of 1 s the streams
    end across that second (no 100 ms holds more than a quarter of them), each with a clean end of
    body, and the process still exits 0 well inside the graceful timeout; with 0 they all end at
    once (the storm the spread prevents)."""
    shutdown_timeout = 4.0
    config = {
        "server": {"shutdown_spread": spread, "shutdown_timeout": shutdown_timeout},
        "database": {"path": str(tmp_path / "gateway.db")},
        "logging": {"format": "json"},
        "providers": {"veriphone": {"enabled": False}},
    }
    ended: list[float] = []
    async with (
        gateway_process(tmp_path, config) as (proc, url),
        httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_connections=STREAMS + 10)) as client,
        contextlib.AsyncExitStack() as stack,
    ):
        creates = [client.post("/v1/sessions", json={"provider": "truecaller"}) for _ in range(STREAMS // 10)]
        urls = [r.json()["stream_url"] for r in await asyncio.gather(*creates)] * 10

        async def open_stream(stream_url: str) -> RawStream:
            stream = RawStream(await stack.enter_async_context(client.stream("GET", stream_url)))
            await stream.until(b"event: status")
            return stream

        streams = await asyncio.gather(*(open_stream(u) for u in urls))

        async def end(stream: RawStream) -> None:
            await stream.rest(timeout=shutdown_timeout + 2)  # httpx raises on a cut body
            ended.append(time.monotonic())

        waiting = [asyncio.ensure_future(end(s)) for s in streams]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*waiting)
        code = await asyncio.wait_for(proc.wait(), shutdown_timeout + 5)
        exited = time.monotonic() - started

    output = (tmp_path / "gateway.log").read_text()
    assert code == 0, output
    assert "Traceback" not in output, output
    offsets = sorted(t - started for t in ended)
    assert len(offsets) == STREAMS and all(s.ended for s in streams)
    per_100ms = Counter(int(t * 10) for t in offsets)
    if spread == 0:
        assert offsets[-1] - offsets[0] < 0.3  # the herd: every browser told to reconnect at once
    else:
        assert offsets[-1] - offsets[0] > 0.6 * spread  # across the window, not in one instant
        assert max(per_100ms.values()) <= STREAMS // 4, per_100ms
        assert offsets[-1] < spread + 0.5  # within the spread (and far inside the graceful timeout)
    assert exited < spread + 3, exited  # the stop still takes a few seconds at most
