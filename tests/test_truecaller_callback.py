"""Parsing Truecaller callback bodies (pure, table-driven), and how a token callback is stored."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.errors import BadRequest
from gateway.providers.truecaller import TOKEN_MEMORY, _store_callback
from gateway.providers.truecaller_callback import (
    StatusCallback,
    TokenCallback,
    loggable_status,
    parse_callback,
)
from gateway.storage import apply_migrations

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


def test_a_token_binds_to_one_session_until_its_memory_runs_out(tmp_path: Path) -> None:
    path = str(tmp_path / "tokens.db")
    apply_migrations(path)
    conn = sqlite3.connect(path, isolation_level=None)
    for sid in ("s-1", "s-2", "s-3"):
        conn.execute(
            "INSERT INTO sessions (id, provider, created_at, updated_at, expires_at)"
            " VALUES (?, 'truecaller', 0, 0, 9e9)",
            (sid,),
        )
    sweep = [0.0]

    def store(sid: str, token: str, at: float) -> str:
        return _store_callback(sid, "https://p.example/v1", token, at, at + 600, sweep)(conn)

    assert store("s-1", "tok-a", 1000.0) == "stored"
    assert store("s-1", "tok-a", 1000.1) == "repeat"  # the same callback again
    assert store("s-2", "tok-a", 1000.2) == "reused"  # login CSRF: refused
    assert store("s-2", "tok-b", 1000.3) == "stored"
    assert conn.execute("SELECT COUNT(*) FROM truecaller_tokens_used").fetchone()[0] == 2
    # once the token's life and the margin have passed, its hash is swept away
    later = 1000.0 + TOKEN_MEMORY + 1
    assert store("s-3", "tok-c", later) == "stored"
    assert [r[0] for r in conn.execute("SELECT session_id FROM truecaller_tokens_used")] == ["s-3"]
    conn.close()
