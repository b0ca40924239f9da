"""Who may start a session: API keys, start tickets, their single use, and nothing stored on a 401."""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.auth import Auth, make_ticket, ticket_message
from gateway.config import settings_from_dict
from gateway.errors import ConfigError, Unauthorized
from tests.utils import run_gateway

pytestmark = pytest.mark.timeout(30)

PHONE = "+15551234567"
OTHER_PHONE = "+15551234568"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


KEYS = (new_secret(), new_secret())  # made at run time: never a secret in the repository
SECRETS = (new_secret(), new_secret())


def count(db: Path, table: str = "sessions") -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def auth_gateway(db: Path, *, require: bool = True, **extra: Any) -> Any:
    raw = {
        "database": {"path": str(db)},
        "logging": {"format": "json"},
        "auth": {"require": require, "ticket_max_age": 600},
        "server": {"cors_allow_origins": ["https://shop.example"]},
        **extra,
    }
    env = {"GATEWAY_API_KEYS": f"{KEYS[0]}, {KEYS[1]}", "GATEWAY_TICKET_SECRET": " ".join(SECRETS)}
    return run_gateway(settings_from_dict(raw, env=env))


def ticket(
    *, exp_in: float = 300, user_ref: str | None = "user-42", phone: str | None = PHONE, secret: str = ""
) -> str:
    return make_ticket(secret or SECRETS[0], exp=int(time.time() + exp_in), user_ref=user_ref, phone=phone)


async def create(c: httpx.AsyncClient, authorization: str | None = None, **body: Any) -> httpx.Response:
    headers = {} if authorization is None else {"authorization": authorization}
    idem = body.pop("idempotency_key", None)
    if idem is not None:
        headers["idempotency-key"] = idem
    return await c.post("/v1/sessions", json={"provider": "truecaller", **body}, headers=headers)


def assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


async def test_api_keys_with_require(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    async with auth_gateway(db) as gw, gw.client() as c:
        assert_401(await create(c))
        assert_401(await create(c, "Bearer " + new_secret()))
        assert_401(await create(c, "Bearer"))
        assert_401(await create(c, "Basic dXNlcjpwYXNz"))
        assert count(db) == 0
        assert (await create(c, "Bearer " + KEYS[0])).status_code == 201
        assert (await create(c, "bearer " + KEYS[1])).status_code == 201  # the rotated second key
        # A browser on an allowed origin goes through CORS: the 401 reaches it readable.
        r = await create(c, None, phone=PHONE)
        assert_401(r)
        pre = await c.options(
            "/v1/sessions",
            headers={
                "origin": "https://shop.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert pre.status_code == 200 and "authorization" in pre.headers["access-control-allow-headers"].lower()
    assert count(db) == 2


async def test_without_require_anonymous_works_and_a_wrong_key_is_still_refused(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    async with auth_gateway(db, require=False) as gw, gw.client() as c:
        assert (await create(c)).status_code == 201
        assert_401(await create(c, "Bearer not-a-key"))
        assert_401(await create(c, "Ticket " + ticket(secret=new_secret()), phone=PHONE, user_ref="user-42"))
        assert (await create(c, "Bearer " + KEYS[1])).status_code == 201
    assert count(db) == 2


async def test_start_tickets(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    body = {"phone": PHONE, "user_ref": "user-42"}
    async with auth_gateway(db) as gw, gw.client() as c:
        refused = {
            "wrong secret": (ticket(secret=new_secret()), body),
            "expired": (ticket(exp_in=-1), body),
            "too far ahead": (ticket(exp_in=3600), body),
            "another phone": (ticket(), {**body, "phone": OTHER_PHONE}),
            "another user_ref": (ticket(), {**body, "user_ref": "user-43"}),
            "no phone": (ticket(), {"user_ref": "user-42"}),
            "fields shifted": (ticket(user_ref=PHONE, phone=None), {"phone": PHONE}),
            "malformed": ("v1.123.abc", body),
            "no nonce": (".".join(t for i, t in enumerate(ticket().split(".")) if i != 2), body),
            "tampered expiry": (ticket().replace("v1.", "v1.1", 1), body),
        }
        for why, (t, b) in refused.items():
            r = await create(c, "Ticket " + t, **b)
            assert r.status_code == 401, why
            assert_401(r)
        assert count(db) == 0 and count(db, "start_tickets_used") == 0

        good = ticket()
        r = await create(c, "Ticket " + good, **body)
        assert r.status_code == 201, r.text
        assert_401(await create(c, "Ticket " + good, **body))  # used once already
        # The second secret (a rotation) signs too; a ticket without user_ref or phone binds both as absent.
        assert (await create(c, "Ticket " + ticket(secret=SECRETS[1]), **body)).status_code == 201
        assert (await create(c, "Ticket " + ticket(user_ref=None, phone=None))).status_code == 201
        assert count(db) == 3 and count(db, "start_tickets_used") == 3

        # Racing starts with one ticket: exactly one session.
        racing = ticket()
        rs = await asyncio.gather(*(create(c, "Ticket " + racing, **body) for _ in range(8)))
        assert sorted(r.status_code for r in rs) == [201] + [401] * 7
    assert count(db) == 4


async def test_racing_starts_with_one_ticket_are_401_not_charged_to_the_phone_limit(tmp_path: Path) -> None:
    """A duplicate of a ticket whose start runs is refused before the abuse limits count it:
    with room for one session per phone, seven racing duplicates are 401, never 429."""
    db = tmp_path / "g.db"
    body = {"phone": PHONE, "user_ref": "user-42"}
    limits = {"limits": {"sessions_per_phone_burst": 1, "sessions_per_phone_rate": 1}}
    async with auth_gateway(db, **limits) as gw, gw.client() as c:
        racing = ticket()
        rs = await asyncio.gather(*(create(c, "Ticket " + racing, **body) for _ in range(8)))
        assert sorted(r.status_code for r in rs) == [201] + [401] * 7, [r.text for r in rs if r.status_code != 401]
        metrics = (await c.get("/metrics")).text
    assert 'gateway_limited_total{limit="sessions_per_phone"} 0.0' in metrics.splitlines()
    assert count(db) == 1 and count(db, "start_tickets_used") == 1


async def test_a_ticket_with_an_idempotency_key_is_answered_again(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    body = {"phone": PHONE, "user_ref": "user-42"}
    async with auth_gateway(db) as gw, gw.client() as c:
        t = ticket()
        first = await create(c, "Ticket " + t, idempotency_key="order-1", **body)
        again = await create(c, "Ticket " + t, idempotency_key="order-1", **body)
        assert first.status_code == again.status_code == 201
        assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()
        # The key stands for this ticket: another (valid) ticket with it is a reuse, no ticket a 401.
        assert (await create(c, "Ticket " + ticket(), idempotency_key="order-1", **body)).status_code == 409
        assert_401(await create(c, idempotency_key="order-1", **body))
        # Without the key the used ticket is refused.
        assert_401(await create(c, "Ticket " + t, **body))
    assert count(db) == 1


async def test_the_veriphone_start_link_needs_a_ticket(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    extra = {"providers": {"veriphone": {"failure_url": "https://shop.example/failed"}}}
    async with auth_gateway(db, **extra) as gw, gw.client() as c:
        for query in ("", "?ticket=v1.1.x", f"?ticket={ticket(user_ref=None, phone=None, secret=new_secret())}"):
            r = await c.get("/v1/veriphone/start" + query)
            assert r.status_code == 307
            assert r.headers["location"] == "https://shop.example/failed?status=failed&reason=unauthorized"
    assert count(db) == 0


# --- the pure parts -------------------------------------------------------------------------


def test_tickets_and_keys_without_a_server() -> None:
    auth = Auth(require=True, api_keys=KEYS, ticket_secrets=SECRETS, ticket_max_age=600)
    now = 1_800_000_000.0
    t = make_ticket(SECRETS[1], exp=int(now) + 60, user_ref="u", phone=PHONE)
    admitted = auth.admit(t, user_ref="u", phone=PHONE, now=now)
    assert admitted.expires_at == now + 60 and t not in admitted.hash
    assert auth.admit(t, user_ref="u", phone=PHONE, now=now).hash == admitted.hash
    for user_ref, phone, at in (("u", PHONE, now + 60), ("u", PHONE, now - 541), ("v", PHONE, now), ("u", None, now)):
        with pytest.raises(Unauthorized):
            auth.admit(t, user_ref=user_ref, phone=phone, now=at)
    # The canonical message: no field can slide into its neighbour.
    assert ticket_message(5, "n" * 22, "a", None) != ticket_message(5, "n" * 22, None, "a")
    assert ticket_message(5, "nonce", "a", "+1") == b"v1\n5\nnonce\na\n+1"
    assert make_ticket(SECRETS[0], exp=5) != make_ticket(SECRETS[0], exp=5)  # a nonce each
    assert auth.identify("Bearer " + KEYS[0]).kind == "key"
    assert auth.identify("Ticket abc").kind == "ticket"
    for header in (None, "Bearer " + KEYS[0][:-1] + "x", "Token abc", ""):
        with pytest.raises(Unauthorized):
            auth.identify(header)
    assert Auth().identify(None).kind == "anonymous"


def test_config_checks_keys_and_secrets_without_echoing_them() -> None:
    weak = "short-but-secret"
    with pytest.raises(ConfigError) as err:
        settings_from_dict({}, env={"GATEWAY_API_KEYS": f"{KEYS[0]},{weak}"})
    assert str(err.value).startswith("GATEWAY_API_KEYS: value 2 of 2 is too short") and weak not in str(err.value)
    with pytest.raises(ConfigError, match="GATEWAY_TICKET_SECRET: value 1 of 1"):
        settings_from_dict({}, env={"GATEWAY_TICKET_SECRET": "a" * 64})
    with pytest.raises(ConfigError, match=re.escape("auth.require is true, but neither GATEWAY_API_KEYS")):
        settings_from_dict({"auth": {"require": True}}, env={})
    with pytest.raises(ConfigError, match=re.escape("auth.ticket_max_age")):
        settings_from_dict({"auth": {"ticket_max_age": 0}})
    with pytest.raises(ConfigError, match=re.escape("auth.api_keys: unknown key")):
        settings_from_dict({"auth": {"api_keys": [KEYS[0]]}})  # keys only from the environment
    settings = settings_from_dict({"auth": {"require": True}}, env={"GATEWAY_API_KEYS": " ".join(KEYS)})
    assert settings.auth.api_keys == KEYS and KEYS[0] not in repr(settings)


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(lang: str, marker: str) -> str:
    for block in re.finditer(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL):
        if marker in block.group(1):
            return block.group(1)
    raise AssertionError(f"no {lang} block with {marker} in README.md")


def test_the_readme_ticket_helpers_make_tickets_the_gateway_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = Auth(ticket_secrets=SECRETS)
    monkeypatch.setenv("GATEWAY_TICKET_SECRET", f"{SECRETS[1]}, {SECRETS[0]}")
    helpers: dict[str, Any] = {}
    exec(readme_block("python", "def start_ticket"), helpers)  # the README's own example
    for user_ref, phone in (("user-42", PHONE), (None, None)):
        auth.admit(helpers["start_ticket"](user_ref, phone), user_ref=user_ref, phone=phone, now=time.time())
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node helper is not checked")
    script = readme_block("js", "function startTicket")
    script += "process.stdout.write(startTicket('user-42', process.argv[1]));"
    made = subprocess.run([node, "-e", script, PHONE], capture_output=True, text=True, timeout=30, check=True)
    auth.admit(made.stdout, user_ref="user-42", phone=PHONE, now=time.time())


async def test_a_backend_with_an_api_key_is_not_held_to_the_per_address_limit(tmp_path: Path) -> None:
    """The site's backend starts every user's session from one address: with a valid API key the
    per-address bucket does not apply (the per-number limit still does); anonymous callers from
    that address are still limited."""
    db = tmp_path / "g.db"
    limits = {"sessions_per_ip_burst": 3, "sessions_per_ip_rate": 1, "exempt": []}
    async with auth_gateway(db, require=False, limits=limits) as gw, gw.client() as c:
        keyed = [
            await create(c, "Bearer " + KEYS[0], provider="truecaller", phone=f"+1555123{n:04d}") for n in range(10)
        ]
        assert {r.status_code for r in keyed} == {201}
        anonymous = [await create(c, None, provider="truecaller") for _ in range(4)]
        assert [r.status_code for r in anonymous] == [201, 201, 201, 429]
        same_number = [await create(c, "Bearer " + KEYS[1], provider="truecaller", phone=PHONE) for _ in range(6)]
        assert [r.status_code for r in same_number][-1] == 429  # sessions per phone number
