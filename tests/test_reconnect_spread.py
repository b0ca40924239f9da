"""No reconnect storms: a jittered `retry:` and stream closes spread over the shutdown window."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.broker import Broker
from tests.utils import RawStream, Running, _serve, listening_socket, make_settings, parse_sse

pytestmark = pytest.mark.timeout(20)


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


async def open_streams(client: httpx.AsyncClient, n: int, stack: contextlib.AsyncExitStack) -> list[RawStream]:
    streams = []
    for _ in range(n):
        sid = (await client.post("/v1/sessions", json={"provider": "truecaller"})).json()["id"]
        response = await stack.enter_async_context(client.stream("GET", f"/v1/sessions/{sid}/events"))
        stream = RawStream(response)
        streams.append(stream)
    return streams


async def test_each_stream_gets_a_retry_within_the_jitter_window(tmp_path: Path) -> None:
    async with (
        gateway(tmp_path, stream={"retry": 3000, "retry_jitter": 2000}) as running,
        running.client() as client,
        contextlib.AsyncExitStack() as stack,
    ):
        retries = []
        for stream in await open_streams(client, 30, stack):
            first = parse_sse(await stream.until(b"event: status"))
            retries.append(int(first[0]["retry"]))
    assert all(3000 <= r <= 5000 for r in retries)
    assert len(set(retries)) > 10  # spread, not one value


async def test_shutdown_closes_streams_spread_over_the_window_and_still_in_time(tmp_path: Path) -> None:
    settings_over = {"server": {"shutdown_spread": 1.0, "shutdown_timeout": 4.0}}
    ended: list[float] = []
    async with gateway(tmp_path, **settings_over) as running, running.client() as client:
        async with contextlib.AsyncExitStack() as stack:
            streams = await open_streams(client, 40, stack)
            for stream in streams:
                await stream.until(b"event: status")

            async def end(stream: RawStream) -> None:
                await stream.rest(timeout=5)
                ended.append(time.monotonic())

            waiting = [asyncio.ensure_future(end(s)) for s in streams]
            started = time.monotonic()
            running.server.should_exit = True  # what SIGTERM does
            await asyncio.gather(*waiting)
    offsets = sorted(t - started for t in ended)
    assert all(s.ended for s in streams) and len(offsets) == 40
    assert offsets[-1] - offsets[0] > 0.4  # spread, not all in one instant
    assert offsets[-1] < 2.5  # within the spread (1 s) and well inside the graceful timeout
