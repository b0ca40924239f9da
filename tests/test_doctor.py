"""`gateway doctor`: all ok straight to the gateway; each kind of misbehaving proxy fails its own check."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.doctor import Check, doctor, run_checks
from tests.utils import Running, make_settings, run_sandbox_gateway

pytestmark = pytest.mark.timeout(30)

ORIGIN = "https://shop.example"
Transform = Callable[[bytes], bytes]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Running]:
    overrides = {"stream": {"heartbeat": 1}, "server": {"cors_allow_origins": [ORIGIN]}}
    async with run_sandbox_gateway(make_settings(tmp_path / "g.db", overrides)) as running:
        yield running


@contextlib.asynccontextmanager
async def proxy(
    upstream_port: int, *, up: Transform = bytes, down: Transform = bytes, hold: bool = False, idle: float = 0.0
) -> AsyncIterator[str]:
    """A TCP proxy on loopback that misbehaves on purpose: rewrites, holds back, or cuts idle streams."""
    tasks: set[asyncio.Task[None]] = set()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, change: Transform, held: bool) -> None:
        kept = b""
        try:
            while True:
                chunk = await (asyncio.wait_for(reader.read(65536), idle) if idle else reader.read(65536))
                if not chunk:
                    break
                if held and (kept or b"text/event-stream" in chunk):
                    kept += chunk  # a buffering proxy: a stream's bytes wait until the upstream is done
                    continue
                writer.write(change(chunk))
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            if kept:
                writer.write(change(kept))
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        for task in (
            asyncio.ensure_future(pump(client_r, up_w, up, False)),
            asyncio.ensure_future(pump(up_r, client_w, down, hold)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def results(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.result for c in checks}


async def check(url: str, **kw: object) -> dict[str, str]:
    options: dict[str, object] = {"direct": None, "origins": [ORIGIN], "heartbeat": 1.0, "timeout": 4.0, **kw}
    return results(await run_checks(url, **options))  # type: ignore[arg-type]


async def test_straight_to_the_gateway_every_check_is_ok(gateway: Running) -> None:
    found = await check(gateway.url, direct=gateway.url)
    assert found == {
        "headers": "ok",
        "buffering": "ok",
        "Last-Event-ID": "ok",
        "idle timeout": "ok",
        f"CORS {ORIGIN}": "ok",
        "CORS https://gateway-doctor.invalid": "ok",
    }
    # and the command's exit code and lines
    code = await asyncio.to_thread(doctor, gateway.url, direct=None, origins=[ORIGIN], heartbeat=1.0, timeout=4.0)
    assert code == 0


async def test_a_buffering_proxy_fails_buffering(gateway: Running) -> None:
    async with proxy(gateway.port, hold=True) as url:
        found = await check(url, timeout=1.5)
    assert found["buffering"] == "FAIL"
    code = await asyncio.to_thread(doctor, url, direct=None, origins=[], heartbeat=1.0, timeout=1.5)
    assert code == 1


async def test_a_proxy_that_strips_last_event_id_fails_that_check(gateway: Running) -> None:
    strip = lambda raw: re.sub(rb"(?im)^last-event-id:[^\r\n]*\r\n", b"", raw)  # noqa: E731
    async with proxy(gateway.port, up=strip) as url:
        found = await check(url)
    assert found["Last-Event-ID"] == "FAIL" and found["buffering"] == "ok"


async def test_a_proxy_that_cuts_idle_streams_fails_the_idle_check(gateway: Running) -> None:
    async with proxy(gateway.port, idle=0.5) as url:
        found = await check(url)
    assert found["idle timeout"] == "FAIL" and found["headers"] == "ok"


async def test_a_proxy_that_drops_cors_headers_fails_cors(gateway: Running) -> None:
    drop = lambda raw: re.sub(rb"(?im)^access-control-allow-origin:[^\r\n]*\r\n", b"", raw)  # noqa: E731
    async with proxy(gateway.port, down=drop) as url:
        found = await check(url)
    assert found[f"CORS {ORIGIN}"] == "FAIL" and found["CORS https://gateway-doctor.invalid"] == "ok"
