"""Parsing Truecaller callback bodies (pure, table-driven), and how a token callback is stored."""

from __future__ import annotations

import hashlib

import pytest

from gateway.errors import BadRequest
from gateway.outcome import Outcome
from gateway.providers.truecaller.decode import (
    StatusCallback,
    TokenCallback,
    loggable_status,
    parse_callback,
)
from gateway.records import TOKEN_MEMORY, Session, TokenClaim
from gateway.storage.base import Store
from tests.pg import sql_rows

ENDPOINT = "https://profile4-noneu.truecaller.com/v1/default"
RID = "RL8YZ41FQMt5Jiak2sc_Ys0OgQA="


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"requestId": RID, "accessToken": "a1asX--x", "endpoint": ENDPOINT}, TokenCallback(RID, "a1asX--x", ENDPOINT)),
        ({"requestId": RID, "status": "user_rejected"}, StatusCallback(RID, "user_rejected")),
        ({"requestId": RID, "status": "flow_invoked"}, StatusCallback(RID, "flow_invoked")),
        ({"requestId": "x", "status": "Something Else!"}, StatusCallback("x", "Something Else!")),
    ],
)
def test_valid_bodies(body: dict[str, object], expected: object) -> None:
    assert parse_callback(body) == expected


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "missing_request_id"),
        ({"status": "user_rejected"}, "missing_request_id"),
        ({"requestId": None, "status": "user_rejected"}, "missing_request_id"),
        ({"requestId": 12345678, "status": "user_rejected"}, "invalid_request_id"),
        ({"requestId": "", "status": "user_rejected"}, "invalid_request_id"),
        ({"requestId": "has space", "status": "user_rejected"}, "invalid_request_id"),
        ({"requestId": "x" * 129, "status": "user_rejected"}, "invalid_request_id"),
        ({"requestId": "nönce", "status": "user_rejected"}, "invalid_request_id"),
        ({"requestId": RID}, "invalid_callback"),
        ({"requestId": RID, "endpoint": ENDPOINT}, "invalid_callback"),
        ({"requestId": RID, "status": "user_rejected", "accessToken": "t", "endpoint": ENDPOINT}, "invalid_callback"),
        ({"requestId": RID, "status": "user_rejected", "endpoint": ENDPOINT}, "invalid_callback"),
        ({"requestId": RID, "status": 1}, "invalid_status"),
        ({"requestId": RID, "status": ""}, "invalid_status"),
        ({"requestId": RID, "status": None}, "invalid_status"),
        ({"requestId": RID, "status": "s" * 65}, "invalid_status"),
        ({"requestId": RID, "accessToken": 5, "endpoint": ENDPOINT}, "invalid_access_token"),
        ({"requestId": RID, "accessToken": "", "endpoint": ENDPOINT}, "invalid_access_token"),
        ({"requestId": RID, "accessToken": "SECRETtok\r\nX-Evil: 1", "endpoint": ENDPOINT}, "invalid_access_token"),
        ({"requestId": RID, "accessToken": "t" * 4097, "endpoint": ENDPOINT}, "invalid_access_token"),
        ({"requestId": RID, "accessToken": "SECRETtok"}, "missing_endpoint"),
        ({"requestId": RID, "accessToken": "SECRETtok", "endpoint": None}, "missing_endpoint"),
        ({"requestId": RID, "accessToken": "SECRETtok", "endpoint": ["https://x"]}, "invalid_endpoint"),
    ],
)
def test_malformed_bodies_get_stable_codes(body: dict[str, object], code: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_callback(body)
    assert info.value.code == code
    assert "SECRET" not in info.value.message  # the token is never echoed


@pytest.mark.parametrize(
    ("status", "shown"),
    [
        ("user_rejected", "user_rejected"),
        ("some_new_status", "some_new_status"),
        ("+919999999999", "<other>"),
        ("Asha Rao", "<other>"),
        ("x" * 33, "<other>"),
    ],
)
def test_only_short_snake_case_statuses_are_logged(status: str, shown: str) -> None:
    assert loggable_status(status) == shown


async def test_a_token_binds_to_one_session_until_its_memory_runs_out(store: Store) -> None:
    for sid in ("s-1", "s-2", "s-3"):
        await store.create(Session(sid, "truecaller", "pending", None, None, None, None, {}, None, 0, 0, 9e9, None))

    async def store_token(sid: str, token: str, at: float) -> str | None:
        token_hash = hashlib.sha256(token.encode()).hexdigest()
        claim = TokenClaim(sid, "https://p.example/v1", token, token_hash, at, at + 600)
        return (await store.progress(sid, {"stage": "profile_fetching"}, now=at, claim=claim)).claim

    assert await store_token("s-1", "tok-a", 1000.0) == "stored"
    assert await store_token("s-1", "tok-a", 1000.1) == "repeat"  # the same callback again
    assert await store_token("s-2", "tok-a", 1000.2) == "reused"  # login CSRF: refused
    assert await store_token("s-2", "tok-b", 1000.3) == "stored"
    assert await store.token_owner(hashlib.sha256(b"tok-a").hexdigest()) == "s-1"
    rows = await sql_rows(store, "SELECT session_id FROM truecaller_tokens_used ORDER BY session_id")
    assert [r["session_id"] for r in rows] == ["s-1", "s-2"]
    # once the token's life and the margin have passed, its hash is swept away
    later = 1000.0 + TOKEN_MEMORY + 1
    assert await store_token("s-3", "tok-c", later) == "stored"
    rows = await sql_rows(store, "SELECT session_id FROM truecaller_tokens_used")
    assert [r["session_id"] for r in rows] == ["s-3"]


def _claim(sid: str, token: str, at: float) -> TokenClaim:
    return TokenClaim(sid, "https://p.example/v1", token, hashlib.sha256(token.encode()).hexdigest(), at, at + 600)


async def test_a_claim_by_requestid_finds_the_pending_session_and_stores_once(store: Store) -> None:
    """How a shared database takes a token callback: the session is found by reference in the write."""
    await store.create(
        Session("s-1", "truecaller", "pending", None, "nonce-1", "+919800000001", "u-1", {}, None, 0, 0, 9e9, None)
    )
    await store.create(Session("s-2", "truecaller", "pending", None, "nonce-2", None, None, {}, None, 0, 0, 9e9, None))
    stage = {"stage": "profile_fetching"}

    got = await store.progress_by_ref("truecaller", "nonce-1", stage, now=1000.0, claim=_claim("", "tok-a", 1000.0))
    assert (got.session_id, got.phone, got.user_ref) == ("s-1", "+919800000001", "u-1")
    assert got.progressed.claim == "stored" and got.progressed.event_id is not None and got.progressed.first
    assert await store.has_claim("s-1")
    _, events = await store.get_with_events("s-1", 0)
    assert [(e.id, e.data) for e in events] == [(got.progressed.event_id, stage)]

    again = await store.progress_by_ref("truecaller", "nonce-1", stage, now=1000.1, claim=_claim("", "tok-a", 1000.1))
    assert (again.session_id, again.progressed.claim, again.progressed.event_id) == ("s-1", "repeat", None)
    reused = await store.progress_by_ref("truecaller", "nonce-2", stage, now=1000.2, claim=_claim("", "tok-a", 1000.2))
    assert (reused.session_id, reused.progressed.claim, reused.progressed.event_id) == ("s-2", "reused", None)
    assert not await store.has_claim("s-2")
    # another provider's reference, or none at all: no session, nothing stored
    for provider, ref in (("veriphone", "nonce-2"), ("truecaller", "nonce-9")):
        none = await store.progress_by_ref(provider, ref, stage, now=1000.3, claim=_claim("", "tok-z", 1000.3))
        assert (none.session_id, none.progressed.claim, none.progressed.event_id) == (None, "gone", None)
    assert await store.token_owner(hashlib.sha256(b"tok-z").hexdigest()) is None
    _, events = await store.get_with_events("s-2", 0)
    assert events == []


async def test_a_claim_on_a_finished_session_is_gone_and_binds_nothing(store: Store) -> None:
    """A refused callback changes no stored state: its token stays free, by id and by reference."""
    await store.create(Session("s-1", "truecaller", "pending", None, "nonce-1", None, None, {}, None, 0, 0, 9e9, None))
    assert await store.finish("s-1", Outcome("rejected", "user_rejected"), now=999.0) is not None
    stage = {"stage": "profile_fetching"}
    by_id = await store.progress("s-1", stage, now=1000.0, claim=_claim("s-1", "tok-a", 1000.0))
    by_ref = await store.progress_by_ref("truecaller", "nonce-1", stage, now=1000.1, claim=_claim("", "tok-a", 1000.1))
    assert (by_id.claim, by_id.event_id) == ("gone", None)
    assert (by_ref.session_id, by_ref.progressed.claim) == (None, "gone")
    assert await store.token_owner(hashlib.sha256(b"tok-a").hexdigest()) is None
    assert not await store.has_claim("s-1")
