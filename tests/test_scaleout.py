"""Several real gateway processes on one real PostgreSQL: any instance serves any request.

A session is created on one instance, streamed from a second and called back on a third; the
outcome must reach the stream, once. Callbacks race over the instances; instances die by
SIGKILL; PostgreSQL restarts under open streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.providers.truecaller.fake import (
    PROFILE_PATH,
    FakeTruecallerState,
    create_fake_truecaller,
    post_callback,
    post_status,
)
from gateway.providers.truecaller.routes import CALLBACK_PATH
from gateway.providers.veriphone.fake import FakeVeriphoneState, create_fake_veriphone, fake_state
from tests.utils import RawStream, free_port, merge, parse_sse, serve_app, to_toml, wait_ready

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_scope="module")]

PHONE = "+919999999999"
VP_PHONE = "+15551234567"
VP_KEY, VP_SECRET = "test-key", "test-secret"
FAKE_PUBLIC = "https://fake-veriph.test"


@dataclass
class Instance:
    name: str
    url: str
    proc: asyncio.subprocess.Process
    config: Path
    port: int

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)


@dataclass
class Cluster:
    """Gateway processes sharing one PostgreSQL database, and the fake providers they call."""

    tmp: Path
    database_url: str
    truecaller: FakeTruecallerState
    truecaller_url: str
    veriphone: FakeVeriphoneState
    veriphone_url: str
    instances: list[Instance] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        return merge(
            {
                "database": {"url": self.database_url, "pool_min": 1, "pool_max": 4},
                "logging": {"format": "json", "level": "warning"},
                "server": {"shutdown_timeout": 2.0, "shutdown_spread": 0},
                "stream": {"heartbeat": 0.5},
                "limits": {"enabled": False},  # many sessions from one address and one phone
                "providers": {
                    "truecaller": {
                        "require_https": False,
                        "require_public_ip": False,
                        "profile_hosts": [f"127.0.0.1:{self.truecaller_url.rsplit(':', 1)[1]}"],
                        "fetch_lease": 1,
                    },
                    "veriphone": {
                        "api_base": self.veriphone_url,
                        "api_key": VP_KEY,
                        "api_secret": VP_SECRET,
                        "success_url": "https://app.example/ok",
                        "failure_url": "https://app.example/fail",
                    },
                },
            },
            self.extra,
        )

    async def start(self, name: str, port: int | None = None) -> Instance:
        port = port or free_port()
        path = self.tmp / f"{name}.toml"
        path.write_text(to_toml(merge(self.config(), {"server": {"port": port, "host": "127.0.0.1"}})))
        env = {**os.environ, "PYTHONMALLOC": "malloc"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(path), env=env,
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        instance = Instance(name, f"http://127.0.0.1:{port}", proc, path, port)
        await wait_ready(instance.url, proc)
        self.instances.append(instance)
        return instance

    async def stop_all(self) -> None:
        for instance in self.instances:
            if instance.proc.returncode is None:
                instance.proc.send_signal(signal.SIGTERM)
        for instance in self.instances:
            try:
                await asyncio.wait_for(instance.proc.wait(), 10)
            except TimeoutError:
                instance.kill()
                await instance.proc.wait()


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, database_url: str, count: int, **extra: Any) -> AsyncIterator[Cluster]:
    tc_app, tc_fake = create_fake_truecaller()
    vp_app = create_fake_veriphone(VP_KEY, VP_SECRET, public_url=FAKE_PUBLIC)
    async with serve_app(tc_app) as tc_url, serve_app(vp_app) as vp_url:
        c = Cluster(tmp_path, database_url, tc_fake, tc_url, fake_state(vp_app), vp_url, extra=extra)
        try:
            await asyncio.gather(*(c.start(f"gw{i}") for i in range(count)))
            c.instances.sort(key=lambda i: i.name)
            yield c
        finally:
            await c.stop_all()


async def start_truecaller(client: httpx.AsyncClient, phone: str = PHONE) -> tuple[str, str]:
    r = await client.post("/v1/sessions", json={"provider": "truecaller", "phone": phone})
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["truecaller"]["request_nonce"]


async def open_stream(client: httpx.AsyncClient, sid: str, last_event_id: str | None = None) -> tuple[Any, RawStream]:
    headers = {"last-event-id": last_event_id} if last_event_id else {}
    cm = client.stream("GET", f"/v1/sessions/{sid}/events", headers=headers)
    response = await cm.__aenter__()
    assert response.status_code == 200
    raw = RawStream(response)
    await raw.until(b"event: status")
    return cm, raw


def events(raw: bytes) -> list[dict[str, Any]]:
    return [
        {"event": e["event"], "id": e.get("id"), "data": json.loads(e["data"])}
        for e in parse_sse(raw)
        if e.get("event") in ("progress", "outcome")
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def three(tmp_path_factory: pytest.TempPathFactory, pg_cluster: Any) -> AsyncIterator[Cluster]:
    """Three instances on one database, shared by the tests that kill nothing (starting
    gateway processes dominates these tests' time); each test makes its own sessions."""
    dsn = await pg_cluster.create_database()
    try:
        async with cluster(tmp_path_factory.mktemp("three"), dsn, 3) as c:
            yield c
    finally:
        await pg_cluster.drop_database(dsn)


async def outcome_on(raw: RawStream, timeout: float = 10) -> list[dict[str, Any]]:
    """Read the stream to its end (the outcome ends it): its progress and outcome events."""
    return events(await raw.rest(timeout))


# --- one session, three instances --------------------------------------------------------------


async def test_truecaller_created_on_a_streamed_on_b_called_back_on_c(three: Cluster) -> None:
    c = three
    a, b, cc = c.instances
    async with a.client() as ca, b.client() as cb, cc.client() as ccc:
        sid, nonce = await start_truecaller(ca)
        cm, raw = await open_stream(cb, sid)
        token = c.truecaller.issue_token(PHONE)
        r = await post_callback(ccc, CALLBACK_PATH, nonce, token, c.truecaller_url + PROFILE_PATH)
        assert r.status_code == 200, r.text
        got = await outcome_on(raw)
        await cm.__aexit__(None, None, None)
    assert [e["event"] for e in got] == ["progress", "outcome"]
    assert got[-1]["data"]["status"] == "verified" and got[-1]["data"]["phone"] == PHONE
    assert len(c.truecaller.requests) == 1


async def test_veriphone_created_on_a_streamed_on_b_result_on_c(three: Cluster) -> None:
    c = three
    a, b, cc = c.instances
    async with a.client() as ca, b.client() as cb, cc.client() as ccc:
        r = await ca.post("/v1/sessions", json={"provider": "veriphone", "phone": VP_PHONE})
        assert r.status_code == 201, r.text
        sid, uuid = r.json()["id"], r.json()["veriphone"]["session_uuid"]
        cm, raw = await open_stream(cb, sid)
        c.veriphone.complete(uuid)
        back = await ccc.get("/v1/callbacks/veriphone", params={"sessionUuid": uuid})
        assert back.status_code == 307, back.text
        got = await outcome_on(raw)
        await cm.__aexit__(None, None, None)
    assert got[-1]["event"] == "outcome" and got[-1]["data"]["status"] == "verified"
    assert [e["event"] for e in got].count("outcome") == 1


# --- races over instances ----------------------------------------------------------------------


async def test_fifty_duplicate_token_callbacks_over_three_instances_fetch_once(three: Cluster) -> None:
    c = three
    clients = [i.client() for i in c.instances]
    try:
        for _ in range(3):
            c.truecaller.requests.clear()
            sid, nonce = await start_truecaller(clients[0])
            token = c.truecaller.issue_token(PHONE)
            endpoint = c.truecaller_url + PROFILE_PATH
            answers = await asyncio.gather(
                *(post_callback(clients[n % 3], CALLBACK_PATH, nonce, token, endpoint) for n in range(50))
            )
            # Every duplicate is answered: accepted, or 404 once another finished the session.
            assert {a.status_code for a in answers} <= {200, 404}, [a.text for a in answers if a.status_code >= 300]
            assert any(a.status_code == 200 for a in answers)
            final = (await clients[1].get(f"/v1/sessions/{sid}", params={"wait": 10})).json()
            assert final["status"] == "verified"
            assert len(c.truecaller.requests) == 1
            cm, raw = await open_stream(clients[2], sid)
            replay = events(await raw.rest())
            await cm.__aexit__(None, None, None)
            assert [e["event"] for e in replay].count("outcome") == 1
    finally:
        for client in clients:
            await client.aclose()


async def test_rejection_racing_a_token_over_instances_gives_one_outcome(three: Cluster) -> None:
    c = three
    a, b = c.instances[:2]
    async with a.client() as ca, b.client() as cb:
        outcomes: list[str] = []
        for round_ in range(20):
            sid, nonce = await start_truecaller(ca)
            token = c.truecaller.issue_token(PHONE)
            calls = [
                post_callback(ca, CALLBACK_PATH, nonce, token, c.truecaller_url + PROFILE_PATH),
                post_status(cb, CALLBACK_PATH, nonce, "user_rejected"),
            ]
            if round_ % 2:
                calls.reverse()
            answers = await asyncio.gather(*calls)
            assert all(x.status_code < 500 for x in answers)
            final = (await cb.get(f"/v1/sessions/{sid}", params={"wait": 10})).json()
            assert final["status"] in ("verified", "rejected"), final
            outcomes.append(final["status"])
            cm, raw = await open_stream(ca, sid)
            replay = events(await raw.rest())
            await cm.__aexit__(None, None, None)
            assert [e["event"] for e in replay].count("outcome") == 1
            assert replay[-1]["data"]["status"] == final["status"]


async def test_refused_token_callbacks_on_a_shared_database_store_nothing(three: Cluster) -> None:
    """On a shared database a token callback finds its session in the write that stores the
    token; the refusals stay what they are on one process, and none of them stores anything."""
    import asyncpg

    c = three
    a, b = c.instances[:2]
    good = c.truecaller_url + PROFILE_PATH
    async with a.client() as ca, b.client() as cb:
        sid, nonce = await start_truecaller(ca)
        other_sid, other_nonce = await start_truecaller(ca)
        c.truecaller.requests.clear()
        token = c.truecaller.issue_token(PHONE)
        unknown = await post_callback(cb, CALLBACK_PATH, "no-such-nonce", "tok-unknown", good)
        unknown_bad = await post_callback(cb, CALLBACK_PATH, "no-such-nonce", "tok-unknown", "https://evil.example/v1")
        bad = await post_callback(cb, CALLBACK_PATH, nonce, token, "https://evil.example/v1")
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "session_not_found")
        assert (unknown_bad.status_code, unknown_bad.json()["error"]["code"]) == (404, "session_not_found")
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_endpoint")
        assert c.truecaller.requests == []
        ok = await post_callback(cb, CALLBACK_PATH, nonce, token, good)
        assert ok.status_code == 200, ok.text
        # the same token for another session, through another instance: a login CSRF
        reused = await post_callback(ca, CALLBACK_PATH, other_nonce, token, good)
        assert (reused.status_code, reused.json()["error"]["code"]) == (400, "token_already_used")
        done = (await ca.get(f"/v1/sessions/{sid}", params={"wait": 10})).json()
        assert done["status"] == "verified"
        late = await post_callback(ca, CALLBACK_PATH, nonce, c.truecaller.issue_token(PHONE), good)
        assert (late.status_code, late.json()["error"]["code"]) == (404, "session_not_found")
    assert len(c.truecaller.requests) == 1
    conn = await asyncpg.connect(c.database_url)
    try:
        bound = await conn.fetch(
            "SELECT u.session_id FROM truecaller_tokens_used u WHERE u.session_id = ANY($1::text[])", [sid, other_sid]
        )
        assert [r["session_id"] for r in bound] == [sid]  # only the accepted token is bound
        assert await conn.fetchval("SELECT count(*) FROM truecaller_tokens_used WHERE session_id = ''") == 0
        assert await conn.fetchval("SELECT count(*) FROM session_events WHERE session_id = $1", other_sid) == 0
        assert await conn.fetchval("SELECT count(*) FROM truecaller_callbacks WHERE session_id = $1", other_sid) == 0
        assert await conn.fetchval("SELECT status FROM sessions WHERE id = $1", other_sid) == "pending"
    finally:
        await conn.close()


async def test_one_idempotency_key_sent_to_every_instance_at_once_starts_one_session(three: Cluster) -> None:
    clients = [i.client() for i in three.instances]
    try:
        for round_ in range(5):
            key = f"order-{round_}-{random.random()}"
            body = {"provider": "truecaller", "phone": PHONE}
            answers = await asyncio.gather(
                *(clients[n % 3].post("/v1/sessions", json=body, headers={"idempotency-key": key}) for n in range(12))
            )
            assert {a.status_code for a in answers} == {201}, [a.text for a in answers if a.status_code != 201]
            assert len({a.json()["id"] for a in answers}) == 1  # every instance answers with the one session
            assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 11
    finally:
        for client in clients:
            await client.aclose()


# --- instances dying -----------------------------------------------------------------------------


def _outcomes(raw: bytes) -> list[dict[str, Any]]:
    return [e for e in events(raw) if e["event"] == "outcome"]


async def _read_until_dead(raw: RawStream) -> bytes:
    """What a stream delivered before its instance died (the connection breaks or ends)."""
    with contextlib.suppress(httpx.HTTPError, TimeoutError, StopAsyncIteration):
        await raw.rest(5)
    out, raw.buf = raw.buf, b""
    return out


async def test_kill_9_of_stream_holder_or_callback_handler_loses_and_doubles_nothing(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Instance b holds the browser's stream and dies by SIGKILL at a random point: while the
    callback is handled by a, or while b itself handles the callback (before its answer, or
    after it, during the profile fetch). The browser reconnects to a with its Last-Event-ID."""
    rng = random.Random(7)
    async with cluster(tmp_path, pg_dsn, 2) as c:
        a, b = c.instances
        endpoint = c.truecaller_url + PROFILE_PATH
        for cycle in range(6):
            kind = ("stream holder", "handler before its answer", "handler during the fetch")[cycle % 3]
            c.truecaller.delay = 0.4 if kind == "handler during the fetch" else 0.0
            async with a.client() as ca, b.client() as cb:
                sid, nonce = await start_truecaller(ca)
                cm, raw = await open_stream(cb, sid)
                token = c.truecaller.issue_token(PHONE)
                handler = ca if kind == "stream holder" else cb
                callback = asyncio.ensure_future(post_callback(handler, CALLBACK_PATH, nonce, token, endpoint))
                if kind == "handler during the fetch":
                    assert (await callback).status_code == 200  # acknowledged: it must not be lost
                # A random point in the flow (not a wait for anything).
                await asyncio.sleep(rng.uniform(0, 0.3 if kind == "handler during the fetch" else 0.03))
                b.kill()
                await b.proc.wait()
                try:
                    answer: httpx.Response | None = await callback
                except httpx.HTTPError:
                    answer = None  # never answered: Truecaller sends it again, to the instance alive
                if answer is None or answer.status_code >= 500:
                    retry = await post_callback(ca, CALLBACK_PATH, nonce, token, endpoint)
                    assert retry.status_code in (200, 404), retry.text
                before = await _read_until_dead(raw)
                with contextlib.suppress(Exception):
                    await cm.__aexit__(None, None, None)
                seen = events(before)
                last_id = seen[-1]["id"] if seen else None
                # The browser reconnects to the instance alive, with the last id it got; the
                # stream ends with the outcome (a taken-over fetch: after the lease), or 204.
                headers = {"last-event-id": last_id} if last_id else {}
                async with (
                    asyncio.timeout(15),
                    ca.stream("GET", f"/v1/sessions/{sid}/events", headers=headers) as again,
                ):
                    assert again.status_code in (200, 204)
                    after = await again.aread()
                total = _outcomes(before) + _outcomes(after)
                assert len(total) == 1, (kind, seen, events(after))
                assert total[0]["data"]["status"] == "verified"
            # b comes back on the same port for the next cycle.
            c.instances.remove(b)
            b = await c.start(b.name, b.port)


async def test_postgresql_restart_under_open_streams_then_everything_catches_up(
    tmp_path: Path, own_pg_cluster: Any
) -> None:
    """PostgreSQL goes away under open streams: no 500 anywhere (503 database_unavailable while
    it is down), the listener comes back, the streams end cleanly and a reconnect catches up."""
    pg = own_pg_cluster
    async with cluster(tmp_path, pg.dsn(), 2) as c:
        a, b = c.instances
        async with a.client() as ca, b.client() as cb:
            sessions = [await start_truecaller(ca) for _ in range(3)]
            streams = [await open_stream(cb, sid) for sid, _ in sessions]
            pg.stop("fast")
            statuses: set[int] = set()
            for client in (ca, cb):
                created = await client.post("/v1/sessions", json={"provider": "truecaller", "phone": PHONE})
                statuses.add(created.status_code)
                assert created.status_code == 503 and created.json()["error"]["code"] == "database_unavailable"
                ready = await client.get("/readyz")
                statuses.add(ready.status_code)
                read = await client.get(f"/v1/sessions/{sessions[0][0]}")
                statuses.add(read.status_code)
            assert 500 not in statuses and statuses <= {503}, statuses
            pg.start()
            # Every open stream ends cleanly once the listener is back (the browser reconnects).
            for cm, raw in streams:
                await raw.rest(15)
                assert raw.ended
                await cm.__aexit__(None, None, None)
            async with asyncio.timeout(15):
                while (await cb.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.05)
            ready = (await cb.get("/readyz")).json()
            assert ready == {"status": "ready", "database": "ok", "listener": "up"}
            # After the reconnect, callbacks on a reach the streams on b again.
            sid, nonce = sessions[0]
            cm, raw = await open_stream(cb, sid)
            token = c.truecaller.issue_token(PHONE)
            r = await post_callback(ca, CALLBACK_PATH, nonce, token, c.truecaller_url + PROFILE_PATH)
            assert r.status_code == 200, r.text
            got = await outcome_on(raw)
            await cm.__aexit__(None, None, None)
            assert [e["event"] for e in got] == ["progress", "outcome"]


# --- serve --workers -----------------------------------------------------------------------------


async def test_serve_workers_two_processes_share_the_port_restart_a_dead_one_and_stop_cleanly(
    tmp_path: Path, pg_dsn: str
) -> None:
    port = free_port()
    config = tmp_path / "workers.toml"
    config.write_text(to_toml({"database": {"url": pg_dsn, "pool_min": 1, "pool_max": 4}, "server": {"port": port}}))
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2", env=env,
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    async def workers_seen(connections: int) -> dict[str, str]:
        """worker number → instance (host:pid), over fresh connections (the kernel spreads them)."""
        seen: dict[str, str] = {}
        for _ in range(connections):
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                text = (await client.get("/metrics")).text
            line = next(x for x in text.splitlines() if x.startswith("gateway_instance_info{"))
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
            seen[labels["worker"].strip('"')] = labels["instance"].strip('"')
        return seen

    try:
        await wait_ready(base, proc)
        async with asyncio.timeout(20):
            seen = await workers_seen(40)
            while len(seen) < 2:  # the second worker may still be starting
                seen.update(await workers_seen(10))
        assert set(seen) == {"0", "1"}
        # A worker that dies is started again; the port keeps answering meanwhile.
        dead_pid = int(seen["0"].rsplit(":", 1)[1])
        os.kill(dead_pid, signal.SIGKILL)
        async with asyncio.timeout(20):
            while True:
                again = await workers_seen(10)
                if again.get("0") not in (None, seen["0"]):
                    break
        # SIGTERM: both workers stop gracefully and the parent exits 0.
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
