"""Who may start a session: API keys for a site's backend, signed start tickets for its pages.

Pure: no I/O. The single use of a ticket is the store's part (`Store.create` records its hash
in the session's transaction); everything else is decided here.

A start ticket is `v1.<exp>.<nonce>.<sig>`: `exp` the Unix second it stops being valid,
`nonce` 16-64 random base64url characters (two tickets for one user in one second differ),
`sig` the base64url (no padding) of
HMAC-SHA256(secret, "v1\\n{exp}\\n{nonce}\\n{user_ref}\\n{phone}"), with an absent user_ref or
phone written as the empty string. No field can hold a newline (user_ref is printable, phone
is E.164, exp digits, nonce base64url), so fields cannot be shifted into each other. The
phone is compared exactly as the gateway accepts it: E.164, `+` and digits.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.errors import Unauthorized

TICKET_VERSION = "v1"
_TICKET = re.compile(r"v1\.([0-9]{1,12})\.([A-Za-z0-9_-]{16,64})\.([A-Za-z0-9_-]{43})")
# At least this long, with this many distinct characters: rejects a typed password, not a random key.
MIN_SECRET_LENGTH = 32
MIN_SECRET_DISTINCT = 8


def strong_enough(secret: str) -> bool:
    """A key or ticket secret that can only have come from a random generator."""
    return (
        len(secret) >= MIN_SECRET_LENGTH
        and len(set(secret)) >= MIN_SECRET_DISTINCT
        and secret.isascii()
        and secret.isprintable()
    )


def split_secrets(raw: str) -> tuple[str, ...]:
    """Several keys or secrets in one variable, separated by spaces or commas (for rotation)."""
    return tuple(part for part in re.split(r"[\s,]+", raw) if part)


def ticket_message(exp: int, nonce: str, user_ref: str | None, phone: str | None) -> bytes:
    return f"{TICKET_VERSION}\n{exp}\n{nonce}\n{user_ref or ''}\n{phone or ''}".encode()


def _sign(secret: str, message: bytes) -> str:
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def make_ticket(secret: str, *, exp: int, user_ref: str | None = None, phone: str | None = None) -> str:
    """What a site's backend (and the sandbox) hands its page: valid until `exp`, for one start."""
    nonce = secrets.token_urlsafe(16)
    return f"{TICKET_VERSION}.{exp}.{nonce}.{_sign(secret, ticket_message(exp, nonce, user_ref, phone))}"


def ticket_hash(ticket: str) -> str:
    """What is stored of a used ticket: never the ticket itself."""
    return hashlib.sha256(b"ticket\x00" + ticket.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Credential:
    """What a request presented: nothing, a checked API key, or a ticket still to be checked."""

    kind: str  # "anonymous" | "key" | "ticket"
    ticket: str = field(default="", repr=False)


ANONYMOUS = Credential("anonymous")
KEY = Credential("key")


@dataclass(frozen=True, slots=True)
class Admitted:
    """A ticket that passed every check but its single use: its hash and when it expires."""

    hash: str
    expires_at: float


class Auth:
    """The `[auth]` policy with the keys and secrets from the environment."""

    def __init__(
        self,
        *,
        require: bool = False,
        api_keys: Iterable[str] = (),
        ticket_secrets: Iterable[str] = (),
        ticket_max_age: float = 600,
    ) -> None:
        self.require = require
        # Digests of equal length: compare_digest then takes the same time whatever was sent.
        self._keys = tuple(hashlib.sha256(k.encode()).digest() for k in api_keys)
        self._secrets = tuple(ticket_secrets)
        self.ticket_max_age = ticket_max_age

    def identify(self, authorization: str | None) -> Credential:
        """The credential of an `Authorization` header (`Bearer <key>` or `Ticket <ticket>`).

        A credential that is sent is checked even when none is required: a wrong key is a 401.
        """
        if authorization is None:
            if self.require:
                raise Unauthorized(
                    "unauthorized", "this gateway needs Authorization: Bearer <API key> or a start ticket"
                )
            return ANONYMOUS
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            if self.key_ok(value):
                return KEY
            raise Unauthorized("unauthorized", "the API key is not valid")
        if scheme.lower() == "ticket" and value:
            return Credential("ticket", value)
        raise Unauthorized("unauthorized", "Authorization must be Bearer <API key> or Ticket <start ticket>")

    def key_ok(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for key in self._keys:  # every key, every time: no early exit to time
            ok |= hmac.compare_digest(digest, key)
        return ok

    def admit(self, ticket: str, *, user_ref: str | None, phone: str | None, now: float) -> Admitted:
        """Check a ticket's signature, expiry and binding to this request's user_ref and phone."""
        match = _TICKET.fullmatch(ticket)
        if match is None:
            raise Unauthorized("unauthorized", "the start ticket is malformed (expected v1.<exp>.<nonce>.<signature>)")
        exp = int(match.group(1))
        # Signed over the request's own fields: a ticket for another phone or user_ref fails here.
        message = ticket_message(exp, match.group(2), user_ref, phone)
        signature = match.group(3).encode()
        ok = False
        for secret in self._secrets:
            ok |= hmac.compare_digest(_sign(secret, message).encode(), signature)
        if not ok:
            raise Unauthorized(
                "unauthorized",
                "the start ticket's signature is not valid (or it was made for another phone or user_ref)",
            )
        if exp <= now:
            raise Unauthorized("unauthorized", "the start ticket has expired")
        if exp > now + self.ticket_max_age:
            raise Unauthorized("unauthorized", "the start ticket's expiry is further ahead than auth.ticket_max_age")
        return Admitted(ticket_hash(ticket), float(exp))
