"""Abuse limits against a real gateway: one hostile address is refused, honest ones keep verifying.

`server.trusted_proxies = ["127.0.0.1"]` lets the tests play many client addresses through
X-Forwarded-For; the sandbox's fake providers call back from loopback, which `limits.exempt`
leaves alone. Raw sockets play the clients no HTTP library would be (slowloris, huge heads).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.utils import RawStream, Running, make_settings, run_gateway, run_sandbox_gateway

pytestmark = pytest.mark.timeout(30)

ATTACKER = "203.0.113.66"
HONEST = "198.51.100.7"


def settings_for(db: Path, limits: dict[str, Any], **extra: Any) -> Any:
    overrides: dict[str, Any] = {
        "server": {"trusted_proxies": ["127.0.0.1"]},
        "stream": {"heartbeat": 0.2},
        "limits": limits,
        **extra,
    }
    return make_settings(db, overrides)


def rows(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])


def as_(ip: str) -> dict[str, str]:
    return {"x-forwarded-for": ip}


async def limited(running: Running, limit: str) -> float:
    async with running.client() as c:
        text = (await c.get("/metrics")).text
    match = re.search(rf'^gateway_limited_total{{limit="{limit}"}} (\S+)$', text, re.M)
    assert match, limit
    return float(match.group(1))


def assert_refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert int(r.headers["retry-after"]) >= 1


async def verify(client: httpx.AsyncClient, ip: str, phone: str = "+15005550001") -> dict[str, Any]:
    """A whole sandbox verification from `ip`: the scripted number taps Continue by itself."""
    created = await client.post("/v1/sessions", json={"provider": "truecaller", "phone": phone}, headers=as_(ip))
    assert created.status_code == 201, created.text
    async with asyncio.timeout(10):
        while True:
            answer = await client.get(created.json()["status_url"], params={"wait": 5}, headers=as_(ip))
            assert answer.status_code == 200, answer.text
            if answer.json()["outcome"] is not None:
                outcome: dict[str, Any] = answer.json()["outcome"]
                return outcome


async def test_a_flood_of_sessions_from_one_address_is_refused_while_another_verifies(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    settings = settings_for(db, {"sessions_per_ip_burst": 5, "sessions_per_ip_rate": 1})
    async with run_sandbox_gateway(settings) as running, running.client() as client:
        flood = await asyncio.gather(
            *(client.post("/v1/sessions", json={"provider": "veriphone"}, headers=as_(ATTACKER)) for _ in range(60))
        )
        assert sorted(r.status_code for r in flood) == [201] * 5 + [429] * 55
        for r in flood:
            if r.status_code == 429:
                assert_refused(r, 429, "rate_limited")
                assert 1 <= int(r.headers["retry-after"]) <= 60  # one a minute
        assert rows(db) == 5  # nothing stored for a refused request (and no provider call made)
        outcome = await verify(client, HONEST)
        assert outcome["status"] == "verified"
        assert rows(db) == 6
        again = await client.post("/v1/sessions", json={"provider": "truecaller"}, headers=as_(ATTACKER))
        assert_refused(again, 429, "rate_limited")
        assert await limited(running, "sessions_per_ip") == 56


async def test_one_phone_number_is_limited_across_addresses(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    settings = settings_for(db, {"sessions_per_phone_burst": 2, "sessions_per_phone_rate": 1})
    async with run_gateway(settings) as running, running.client() as client:
        answers = [
            await client.post(
                "/v1/sessions", json={"provider": "truecaller", "phone": "+919812345678"}, headers=as_(f"192.0.2.{i}")
            )
            for i in range(1, 6)
        ]
        assert [r.status_code for r in answers] == [201, 201, 429, 429, 429]
        assert_refused(answers[2], 429, "rate_limited")
        other = await client.post(
            "/v1/sessions", json={"provider": "truecaller", "phone": "+919812345679"}, headers=as_("192.0.2.1")
        )
        assert other.status_code == 201
        assert rows(db) == 3
        assert await limited(running, "sessions_per_phone") == 3


async def test_the_pending_cap_answers_503_too_many_pending(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    async with run_gateway(settings_for(db, {"max_pending_sessions": 3})) as running, running.client() as client:
        answers = [
            await client.post("/v1/sessions", json={"provider": "truecaller"}, headers=as_(f"192.0.2.{i}"))
            for i in range(5)
        ]
        assert [r.status_code for r in answers] == [201, 201, 201, 503, 503]
        assert_refused(answers[3], 503, "too_many_pending")
        assert rows(db) == 3


async def open_stream(port: int, path: str, ip: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nx-forwarded-for: {ip}\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    return reader, writer, status


async def test_one_address_opening_thousands_of_streams_is_capped_and_others_keep_streaming(tmp_path: Path) -> None:
    attempts, cap = 5000, 50  # as many as a hostile page could open; about 6 s on 2 cores
    db = tmp_path / "g.db"
    async with run_sandbox_gateway(settings_for(db, {"streams_per_ip": cap})) as running, running.client() as client:
        sid = (await client.post("/v1/sessions", json={"provider": "truecaller"}, headers=as_(HONEST))).json()["id"]
        path = f"/v1/sessions/{sid}/events"
        async with contextlib.AsyncExitStack() as stack:
            # Two honest streams first; they must keep getting heartbeats through the attack.
            honest = []
            for _ in range(2):
                response = await stack.enter_async_context(client.stream("GET", path, headers=as_(HONEST)))
                assert response.status_code == 200
                honest.append(RawStream(response))
            held: list[asyncio.StreamWriter] = []
            statuses: dict[int, int] = {}
            gate = asyncio.Semaphore(400)  # file descriptors: client and server side live in this process

            async def attempt() -> None:
                async with gate:
                    _, writer, status = await open_stream(running.port, path, ATTACKER)
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        held.append(writer)  # kept open: it holds one of the address's slots
                    else:
                        writer.close()

            started = time.monotonic()
            await asyncio.gather(*(attempt() for _ in range(attempts)))
            elapsed = time.monotonic() - started
            print(f"{attempts} stream attempts from one address in {elapsed:.2f} s: {statuses}")
            assert statuses == {200: cap, 429: attempts - cap}
            assert running.gateway.admission.limits.streams.used == cap + 2
            for stream in honest:
                await stream.until(b":", timeout=2)  # a heartbeat comment still arrives
            assert (await verify(client, "198.51.100.8"))["status"] == "verified"
            for writer in held:
                writer.close()
        assert await limited(running, "streams_per_ip") == attempts - cap
        async with asyncio.timeout(5):  # every slot comes back once its stream is gone
            while running.gateway.admission.limits.streams.used:
                await asyncio.sleep(0.02)


async def test_the_global_stream_and_long_poll_caps_answer_503_server_busy(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    limits = {"streams_total": 3, "streams_per_ip": 3, "long_polls_total": 2, "long_polls_per_ip": 1}
    async with run_gateway(settings_for(db, limits)) as running, running.client() as client:
        sid = (await client.post("/v1/sessions", json={"provider": "truecaller"}, headers=as_(HONEST))).json()["id"]
        path = f"/v1/sessions/{sid}/events"
        async with contextlib.AsyncExitStack() as stack:
            for i in range(3):
                response = await stack.enter_async_context(client.stream("GET", path, headers=as_(f"192.0.2.{i}")))
                assert response.status_code == 200
            busy = await client.get(path, headers=as_("192.0.2.200"))
            assert_refused(busy, 503, "server_busy")
        async with client.stream("GET", path, headers=as_("192.0.2.200")) as again:
            assert again.status_code == 200  # the slots came back: a stream opens again

        status_url = f"/v1/sessions/{sid}"
        first = asyncio.create_task(client.get(status_url, params={"wait": 20}, headers=as_("192.0.2.1")))
        await wait_for(lambda: running.gateway.admission.limits.long_polls.used == 1)
        same = await client.get(status_url, params={"wait": 20}, headers=as_("192.0.2.1"))
        assert_refused(same, 429, "rate_limited")
        second = asyncio.create_task(client.get(status_url, params={"wait": 20}, headers=as_("192.0.2.2")))
        await wait_for(lambda: running.gateway.admission.limits.long_polls.used == 2)
        full = await client.get(status_url, params={"wait": 20}, headers=as_("192.0.2.3"))
        assert_refused(full, 503, "server_busy")
        assert (await client.get(status_url, headers=as_("192.0.2.3"))).status_code == 200  # no wait: no cap
        first.cancel()
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(first, second)
        await wait_for(lambda: running.gateway.admission.limits.long_polls.used == 0)
        assert await limited(running, "long_polls_total") == 1


async def wait_for(condition: Any, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_callbacks_are_limited_per_source_address(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    settings = settings_for(db, {"callbacks_per_ip_burst": 3, "callbacks_per_ip_rate": 1})
    async with run_gateway(settings) as running, running.client() as client:
        body = {"requestId": "nonce-that-does-not-exist", "status": "user_rejected"}
        answers = [await client.post("/v1/callbacks/truecaller", json=body, headers=as_(ATTACKER)) for _ in range(5)]
        assert [r.status_code for r in answers][3:] == [429, 429] and 429 not in [r.status_code for r in answers][:3]
        assert_refused(answers[4], 429, "rate_limited")
        # Truecaller's servers (another address) are not slowed by it.
        assert (await client.post("/v1/callbacks/truecaller", json=body, headers=as_(HONEST))).status_code != 429
        vp = await client.post("/v1/callbacks/veriphone", json={"sessionUuid": "x"}, headers=as_(ATTACKER))
        assert_refused(vp, 429, "rate_limited")
        redirect = await client.get("/v1/callbacks/veriphone?sessionUuid=x", headers=as_(ATTACKER))
        assert redirect.status_code == 307 and "reason=rate_limited" in redirect.headers["location"]


# --- slow and oversized requests -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[int, bytes]:
    """(status, the rest up to the connection's close): every refusal here closes the connection."""
    data = b""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                data += chunk
    return int(data.split(b" ", 2)[1]), data


async def test_a_trickled_body_is_cut_at_body_timeout(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    async with run_gateway(settings_for(db, {"body_timeout": 0.5})) as running:
        async with raw_connection(running.port) as (reader, writer):
            body = b'{"provider": "truecaller"}'
            writer.write(
                b"POST /v1/sessions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % len(body)
            )
            started = time.monotonic()

            async def trickle() -> None:
                for byte in body:  # one byte a second: 26 s for the whole body
                    writer.write(bytes([byte]))
                    await asyncio.sleep(1)

            dripping = asyncio.create_task(trickle())
            status, data = await read_answer(reader)
            dripping.cancel()
            assert status == 408 and b'"code":"body_timeout"' in data
            assert 0.5 <= time.monotonic() - started < 3
        assert rows(db) == 0
        assert await limited(running, "body_timeout") == 1


async def megabyte_head(port: int, start: bytes) -> tuple[int, bytes]:
    """Send `start` and then 1 MiB of filler, 16 KiB at a time, until the gateway answers."""
    async with raw_connection(port) as (reader, writer):
        answer = asyncio.create_task(read_answer(reader))
        writer.write(start)
        with contextlib.suppress(ConnectionError):
            for _ in range(64):
                if answer.done():
                    break
                writer.write(b"a" * 16384)
                await writer.drain()
        return await answer


async def test_oversized_heads_and_queries_are_refused_with_431_and_414(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    async with run_gateway(settings_for(db, {})) as running:
        status, data = await megabyte_head(running.port, b"POST /v1/sessions HTTP/1.1\r\nhost: x\r\nx-filler: ")
        assert status == 431 and b'"code":"headers_too_large"' in data
        status, data = await megabyte_head(running.port, b"GET /v1/sessions/" + b"a" * 32 + b"?wait=1&pad=")
        assert status == 431  # a megabyte of query is a megabyte of head
        async with raw_connection(running.port) as (reader, writer):  # many headers, each one small
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-a: b\r\n" * 5000 + b"\r\n")
            status, data = await read_answer(reader)
        assert status == 431
        async with running.client() as client:
            huge_query = await client.get("/v1/sessions/" + "a" * 32 + "?wait=1&pad=" + "b" * 4096)
            assert huge_query.status_code == 414 and huge_query.json()["error"]["code"] == "query_too_long"
            ok = await client.get("/healthz?pad=" + "b" * 1000, headers={"x-filler": "a" * 8000})
            assert ok.status_code == 200  # below the caps: nothing refused
        assert rows(db) == 0
        assert await limited(running, "max_header_bytes") == 3
        assert await limited(running, "max_query_bytes") == 1


async def test_slow_headers_are_cut_at_header_timeout(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    async with run_gateway(settings_for(db, {"header_timeout": 1.0})) as running:
        async with raw_connection(running.port) as (reader, writer):
            writer.write(b"POST /v1/sessions HTTP/1.1\r\nhost: x\r\n")  # and then nothing more
            status, data = await read_answer(reader)
            assert status == 408 and b'"code":"header_timeout"' in data
        async with raw_connection(running.port) as (reader, writer):  # connects and says nothing at all
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed without an answer
        async with raw_connection(running.port) as (reader, writer):  # an honest keep-alive client
            for _ in range(3):
                writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                assert (await reader.readuntil(b"}"))[:12] == b"HTTP/1.1 200"
                await asyncio.sleep(0.4)  # 1.2 s in all: each request's head came in time
        assert await limited(running, "header_timeout") == 2


async def test_limits_off_restores_the_old_behaviour(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    settings = settings_for(db, {"enabled": False, "sessions_per_ip_burst": 1, "streams_per_ip": 1})
    async with run_gateway(settings) as running, running.client() as client:
        for _ in range(3):
            r = await client.post("/v1/sessions", json={"provider": "truecaller"}, headers=as_(ATTACKER))
            assert r.status_code == 201
        ok = await client.get("/healthz", headers={"x-filler": "a" * 40000})
        assert ok.status_code == 200
