"""The SSE stream over a real uvicorn and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

from gateway.outcome import Outcome
from tests.utils import RawStream, Running, make_settings, parse_sse, run_gateway

VERIFIED = Outcome(
    "verified",
    phone="+919999999999",
    profile={"first_name": "Asha", "last_name": "Rao", "email": None, "country": "IN"},
)


async def new_session(c: httpx.AsyncClient, **body: object) -> str:
    r = await c.post("/v1/sessions", json={"provider": "truecaller", **body})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_status_progress_outcome_then_end(gw: Running) -> None:
    async with gw.client() as c:
        sid = await new_session(c, user_ref="user-42")
        async with c.stream("GET", f"/v1/sessions/{sid}/events") as st:
            assert st.status_code == 200
            assert st.headers["content-type"].startswith("text/event-stream")
            assert st.headers["cache-control"] == "no-store"
            assert st.headers["x-accel-buffering"] == "no"
            rs = RawStream(st)
            first = parse_sse(await rs.until(b"event: status"))
            assert first[0]["retry"] == "3000"
            snapshot = json.loads(first[0]["data"])
            assert snapshot["id"] == sid and snapshot["status"] == "pending" and snapshot["outcome"] is None
            await gw.gateway.sessions.progress(sid, "flow_invoked")
            progress = [e for e in parse_sse(await rs.until(b"event: progress")) if "event" in e]
            assert progress[0]["event"] == "progress" and json.loads(progress[0]["data"]) == {"stage": "flow_invoked"}
            await gw.gateway.sessions.finish(sid, VERIFIED)
            tail = [e for e in parse_sse(await rs.rest()) if "event" in e]
    assert [e["event"] for e in tail] == ["outcome"]
    outcome = json.loads(tail[0]["data"])
    assert outcome["status"] == "verified" and outcome["phone"] == "+919999999999"
    assert outcome["user_ref"] == "user-42" and outcome["provider"] == "truecaller"
    assert outcome["profile"]["country"] == "IN" and outcome["completed_at"].endswith("Z")
    assert tail[0]["id"].isdigit() and int(tail[0]["id"]) > int(progress[0]["id"])
    assert rs.ended


async def test_late_subscriber_gets_outcome_at_once_and_reconnect_gets_204(gw: Running) -> None:
    async with gw.client() as c:
        sid = await new_session(c)
        await gw.gateway.sessions.progress(sid, "flow_invoked")
        await gw.gateway.sessions.finish(sid, VERIFIED)
        async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events") as source:
            events = [ev async for ev in source.aiter_sse()]
        names = [e.event for e in events]
        assert names == ["status", "progress", "outcome"]
        assert json.loads(events[0].data)["status"] == "verified"
        outcome_id = events[-1].id
        again = await c.get(f"/v1/sessions/{sid}/events", headers={"last-event-id": outcome_id})
        assert again.status_code == 204
        # a client that only saw the progress event still gets the outcome
        async with aconnect_sse(
            c, "GET", f"/v1/sessions/{sid}/events", headers={"last-event-id": events[1].id}
        ) as source:
            names = [ev.event async for ev in source.aiter_sse()]
        assert names == ["status", "outcome"]


async def test_reconnect_mid_flow_replays_only_what_was_missed(gw: Running) -> None:
    async with gw.client() as c:
        sid = await new_session(c)
        await gw.gateway.sessions.progress(sid, "flow_invoked")
        await gw.gateway.sessions.progress(sid, "profile_fetching")
        _, rows = await gw.gateway.sessions.get_with_events(sid, 0)
        async with c.stream("GET", f"/v1/sessions/{sid}/events", headers={"last-event-id": str(rows[0].id)}) as st:
            rs = RawStream(st)
            got = [e for e in parse_sse(await rs.until(b"profile_fetching")) if e.get("event") == "progress"]
            assert [json.loads(e["data"])["stage"] for e in got] == ["profile_fetching"]
            await gw.gateway.sessions.finish(sid, Outcome("failed", "access_denied"))
            tail = [e for e in parse_sse(await rs.rest()) if "event" in e]
    assert [e["event"] for e in tail] == ["outcome"]


async def test_many_subscribers_each_get_the_outcome_once(gw: Running) -> None:
    async with gw.client(limits=httpx.Limits(max_connections=100)) as c:
        sid = await new_session(c)

        async def listen() -> list[str]:
            async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events") as source:
                return [ev.event async for ev in source.aiter_sse()]

        listeners = [asyncio.ensure_future(listen()) for _ in range(30)]
        # finish while subscribers are still connecting: none may miss it or get it twice
        await asyncio.sleep(0)
        await gw.gateway.sessions.finish(sid, VERIFIED)
        results = await asyncio.wait_for(asyncio.gather(*listeners), 10)
    for names in results:
        assert names.count("outcome") == 1 and names[-1] == "outcome"


async def test_heartbeats_follow_the_configured_interval(gw: Running) -> None:
    async with gw.client() as c:
        sid = await new_session(c)
        async with c.stream("GET", f"/v1/sessions/{sid}/events") as st:
            rs = RawStream(st)
            await rs.until(b"event: status")
            start = time.monotonic()
            for _ in range(3):
                assert await rs.until(b":\n\n", timeout=2) == b":\n\n"
            elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 1.5  # three beats at 0.2 s, with slack for a loaded machine


async def test_first_bytes_arrive_before_anything_happens(gw: Running) -> None:
    async with gw.client() as c:
        sid = await new_session(c)
        t0 = time.monotonic()
        async with c.stream("GET", f"/v1/sessions/{sid}/events") as st:
            await RawStream(st).until(b"event: status", timeout=1)
        assert time.monotonic() - t0 < 0.15  # well before the first heartbeat (0.2 s)


async def test_stream_closes_after_max_duration(db_path: Path) -> None:
    settings = make_settings(db_path, {"stream": {"heartbeat": 0.1, "max_duration": 0.35}})
    async with run_gateway(settings) as gw, gw.client() as c:
        sid = await new_session(c)
        async with c.stream("GET", f"/v1/sessions/{sid}/events") as st:
            rest = await RawStream(st).rest(timeout=3)
        assert rest.count(b":\n\n") >= 2 and b"event: outcome" not in rest
        assert gw.gateway.broker.count() == 0


async def test_expiry_reaches_the_stream(db_path: Path) -> None:
    settings = make_settings(db_path, {"sessions": {"ttl": 1}, "stream": {"heartbeat": 5}})
    async with run_gateway(settings) as gw, gw.client() as c:
        sid = await new_session(c)
        async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events") as source:
            events = await asyncio.wait_for(_collect(source), 5)
    assert events[-1][0] == "outcome"
    outcome = json.loads(events[-1][1])
    assert (outcome["status"], outcome["reason"]) == ("expired", "timeout")


async def _collect(source: object) -> list[tuple[str, str]]:
    return [(ev.event, ev.data) async for ev in source.aiter_sse()]  # type: ignore[attr-defined]


async def test_disconnected_clients_are_forgotten(gw: Running) -> None:
    async with gw.client() as c:
        sid = await new_session(c)
        for _ in range(5):
            async with c.stream("GET", f"/v1/sessions/{sid}/events") as st:
                await RawStream(st).until(b"event: status")

    # each closed connection must drop its subscription; wait for the server to notice
    async def drained() -> None:
        while gw.gateway.broker.count():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(drained(), 5)


async def test_shutdown_ends_open_streams_cleanly(db_path: Path) -> None:
    settings = make_settings(db_path, {"stream": {"heartbeat": 5}})
    async with run_gateway(settings) as gw:
        c = gw.client()
        sid = await new_session(c)
        st_cm = c.stream("GET", f"/v1/sessions/{sid}/events")
        st = await st_cm.__aenter__()
        rs = RawStream(st)
        await rs.until(b"event: status")
        gw.server.should_exit = True  # as on SIGTERM
        await rs.rest(timeout=5)  # ends without an error: a clean close
        assert rs.ended
        await st_cm.__aexit__(None, None, None)
        await c.aclose()


async def test_outcome_survives_a_restart(db_path: Path) -> None:
    settings = make_settings(db_path)
    async with run_gateway(settings) as gw, gw.client() as c:
        sid = await new_session(c)
        await gw.gateway.sessions.finish(sid, VERIFIED)
    async with run_gateway(settings) as gw2, gw2.client() as c:
        body = (await c.get(f"/v1/sessions/{sid}")).json()
        assert body["status"] == "verified" and body["outcome"]["phone"] == "+919999999999"
        async with aconnect_sse(c, "GET", f"/v1/sessions/{sid}/events") as source:
            events = [ev async for ev in source.aiter_sse()]
        assert [e.event for e in events] == ["status", "outcome"]
        assert json.loads(events[-1].data) == body["outcome"]


async def test_odd_or_forged_last_event_ids_never_break_the_stream(gw: Running) -> None:
    async with gw.client() as c:
        sid = await new_session(c)
        # a non-ASCII digit must not be a 500
        async with c.stream("GET", f"/v1/sessions/{sid}/events", headers={"last-event-id": b"\xb2"}) as st:
            assert st.status_code == 200
            await RawStream(st).until(b"event: status")
        # an id beyond anything this session will publish must not hide its outcome
        async with c.stream("GET", f"/v1/sessions/{sid}/events", headers={"last-event-id": "999999999"}) as st:
            rs = RawStream(st)
            await rs.until(b"event: status")
            await gw.gateway.sessions.finish(sid, VERIFIED)
            assert b"event: outcome" in await rs.rest()
