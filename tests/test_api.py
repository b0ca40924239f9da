"""The session API over real HTTP: validation, errors, persistence, polling, CORS."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import httpx
import pytest

from gateway.errors import StorageError
from gateway.outcome import Outcome
from tests.utils import Running


def count_sessions(db_path: Path) -> int:
    with sqlite3.connect(db_path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])


async def test_create_returns_the_contract_shape(gw: Running, db_path: Path) -> None:
    async with gw.client() as c:
        r = await c.post("/v1/sessions", json={"provider": "truecaller", "phone": "+919999999999", "user_ref": "u-1"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"id", "provider", "status", "expires_at", "stream_url", "status_url", "truecaller"}
    assert body["status"] == "pending" and body["provider"] == "truecaller"
    assert body["stream_url"] == f"/v1/sessions/{body['id']}/events"
    assert body["status_url"] == f"/v1/sessions/{body['id']}"
    assert body["expires_at"].endswith("Z")
    assert body["id"] != body["truecaller"]["request_nonce"]
    with sqlite3.connect(db_path) as conn:
        row = conn.execute(
            "SELECT provider, status, phone, user_ref FROM sessions WHERE id = ?", (body["id"],)
        ).fetchone()
    assert row == ("truecaller", "pending", "+919999999999", "u-1")


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        (
            {"content": b'{"provider":"truecaller"}', "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ({"content": b'{"provider":', "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"json": ["truecaller"]}, 400, "invalid_body"),
        ({"json": {"provider": "truecaller", "extra": 1}}, 400, "unknown_field"),
        ({"json": {"provider": "whatsapp"}}, 400, "invalid_provider"),
        ({"json": {}}, 400, "invalid_provider"),
        ({"json": {"provider": "truecaller", "phone": "5551234567"}}, 400, "invalid_phone"),
        ({"json": {"provider": "truecaller", "phone": "+1555abc4567"}}, 400, "invalid_phone"),
        ({"json": {"provider": "truecaller", "phone": 15551234567}}, 400, "invalid_phone"),
        ({"json": {"provider": "truecaller", "phone": "+1234"}}, 400, "invalid_phone"),
        ({"json": {"provider": "truecaller", "user_ref": "x" * 129}}, 400, "invalid_user_ref"),
        ({"json": {"provider": "truecaller", "user_ref": ""}}, 400, "invalid_user_ref"),
        ({"json": {"provider": "truecaller", "user_ref": "a\nb"}}, 400, "invalid_user_ref"),
        ({"json": {"provider": "truecaller", "user_ref": "x" * 17000}}, 413, "body_too_large"),
    ],
)
async def test_bad_requests_get_a_stable_code_and_store_nothing(
    gw: Running, db_path: Path, kwargs: dict[str, object], status: int, code: str
) -> None:
    async with gw.client() as c:
        r = await c.post("/v1/sessions", **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert count_sessions(db_path) == 0


async def test_body_cap_holds_without_content_length(gw: Running, db_path: Path) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        yield b'{"provider":"truecaller","user_ref":"'
        for _ in range(20):
            yield b"x" * 1024
        yield b'"}'

    async with gw.client() as c:
        r = await c.post("/v1/sessions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert count_sessions(db_path) == 0


async def test_unknown_ids_and_routes_are_json_404s(gw: Running) -> None:
    async with gw.client() as c:
        for path in (
            "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "/v1/sessions/short",
            "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/events",
            "/nothing-here",
        ):
            r = await c.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"]["code"] in ("session_not_found", "not_found")
        r = await c.delete("/v1/sessions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


async def test_disabled_provider_is_a_409(db_path: Path) -> None:
    from tests.utils import make_settings, run_gateway

    settings = make_settings(db_path, {"providers": {"veriphone": {"enabled": False}}})
    async with run_gateway(settings) as gw, gw.client() as c:
        r = await c.post("/v1/sessions", json={"provider": "veriphone"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "provider_disabled"
    assert count_sessions(db_path) == 0


async def test_poll_with_wait_returns_when_the_outcome_lands(gw: Running) -> None:
    async with gw.client() as c:
        sid = (await c.post("/v1/sessions", json={"provider": "truecaller"})).json()["id"]
        plain = await c.get(f"/v1/sessions/{sid}")
        assert plain.json()["status"] == "pending" and plain.json()["outcome"] is None
        poll = asyncio.ensure_future(c.get(f"/v1/sessions/{sid}", params={"wait": 20}))
        done, _ = await asyncio.wait({poll}, timeout=0.3)
        assert not done  # held while pending
        await gw.gateway.sessions.finish(sid, Outcome("rejected", "user_rejected"))
        r = await asyncio.wait_for(poll, 5)
    body = r.json()
    assert set(body) == {"id", "provider", "status", "expires_at", "updated_at", "outcome"}
    assert body["status"] == "rejected" and body["outcome"]["reason"] == "user_rejected"


async def test_poll_wait_is_capped_and_validated(db_path: Path) -> None:
    from tests.utils import make_settings, run_gateway

    async with run_gateway(make_settings(db_path, {"polling": {"max_wait": 0.2}})) as gw, gw.client() as c:
        sid = (await c.post("/v1/sessions", json={"provider": "truecaller"})).json()["id"]
        r = await asyncio.wait_for(c.get(f"/v1/sessions/{sid}", params={"wait": 1000}), 5)
        assert r.status_code == 200 and r.json()["status"] == "pending"
        for bad in ("-1", "abc", "nan", "inf"):
            r = await c.get(f"/v1/sessions/{sid}", params={"wait": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_wait"


async def test_cors_only_for_configured_origins(gw: Running) -> None:
    allowed, other = "https://shop.example", "https://evil.example"
    async with gw.client() as c:
        pre = await c.options(
            "/v1/sessions",
            headers={
                "origin": allowed,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == allowed
        bad = await c.options("/v1/sessions", headers={"origin": other, "access-control-request-method": "POST"})
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
        created = await c.post("/v1/sessions", json={"provider": "truecaller"}, headers={"origin": allowed})
        assert created.headers["access-control-allow-origin"] == allowed
        sid = created.json()["id"]
        r = await c.get(f"/v1/sessions/{sid}", headers={"origin": other})
        assert "access-control-allow-origin" not in r.headers
        async with c.stream("GET", f"/v1/sessions/{sid}/events", headers={"origin": allowed}) as st:
            assert st.headers["access-control-allow-origin"] == allowed
        async with c.stream("GET", f"/v1/sessions/{sid}/events", headers={"origin": other}) as st:
            assert "access-control-allow-origin" not in st.headers


async def test_health_and_readiness(gw: Running) -> None:
    async with gw.client() as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        assert (await c.get("/readyz")).json() == {"status": "ready", "database": "ok"}


async def test_concurrent_creates_all_persist(gw: Running, db_path: Path) -> None:
    async with gw.client(limits=httpx.Limits(max_connections=50)) as c:
        rs = await asyncio.gather(*(c.post("/v1/sessions", json={"provider": "truecaller"}) for _ in range(100)))
    assert all(r.status_code == 201 for r in rs)
    assert len({r.json()["id"] for r in rs}) == 100
    assert count_sessions(db_path) == 100


async def test_hostile_bodies_are_400s_not_500s(gw: Running, db_path: Path) -> None:
    async with gw.client() as c:
        deep = await c.post(
            "/v1/sessions", content=b"[" * 5000 + b"]" * 5000, headers={"content-type": "application/json"}
        )
        assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"
        newline = await c.post("/v1/sessions", json={"provider": "truecaller", "phone": "+4915123456789\n"})
        assert newline.status_code == 400 and newline.json()["error"]["code"] == "invalid_phone"
    assert count_sessions(db_path) == 0


async def test_hot_routes_answer_alike_with_and_without_the_middleware(
    gw: Running, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/sessions and the Truecaller callback skip Starlette's layers when no Origin is
    sent (app.EndpointDoor); through either path, the answers are the same."""
    origin = {"origin": "https://evil.example"}  # not allowed: only the full stack sees it, and adds nothing
    as_json = {"content-type": "application/json"}
    requests = [
        ("/v1/sessions", b'{"provider": "truecaller"}'),
        ("/v1/sessions", b'{"provider": "whatsapp"}'),
        ("/v1/sessions", b"{"),
        ("/v1/sessions", b'{"provider": "truecaller", "user_ref": "' + b"x" * 17000 + b'"}'),
        ("/v1/callbacks/truecaller", b'{"requestId": "' + b"n" * 32 + b'", "status": "flow_invoked"}'),
    ]
    async with gw.client() as c:
        for path, body in requests:
            door = await c.post(path, content=body, headers=as_json)
            stack = await c.post(path, content=body, headers={**as_json, **origin})
            assert door.status_code == stack.status_code, path
            assert door.headers["content-type"] == stack.headers["content-type"] == "application/json"
            assert door.headers["vary"] == stack.headers["vary"] == "Origin"
            assert door.headers.get("cache-control") == stack.headers.get("cache-control")
            assert len(door.headers["x-request-id"]) == 16
            if door.status_code >= 400:
                assert door.json() == stack.json()
            else:
                assert set(door.json()) == set(stack.json()) and door.json()["id"] != stack.json()["id"]

        async def broken_create(**kwargs: object) -> None:
            raise RuntimeError("storage exploded")

        before = count_sessions(db_path)
        monkeypatch.setattr(gw.gateway.sessions, "create", broken_create)
        for headers in ({}, origin):
            r = await c.post("/v1/sessions", json={"provider": "truecaller"}, headers=headers)
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert count_sessions(db_path) == before

        async def failing_disk(**kwargs: object) -> None:
            raise StorageError("database write failed: disk I/O error")

        monkeypatch.setattr(gw.gateway.sessions, "create", failing_disk)
        for headers in ({}, origin):
            r = await c.post("/v1/sessions", json={"provider": "truecaller"}, headers=headers)
            assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
        assert count_sessions(db_path) == before
