"""Starting a verification: validate, let the provider prepare, then store — the one way a session comes to exist."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import phonenumbers

from gateway.admission import Admission
from gateway.auth import ANONYMOUS, Admitted, Auth, Credential
from gateway.disk import DiskCap
from gateway.errors import BadRequest, Conflict, Unauthorized
from gateway.metrics import Metrics
from gateway.providers.base import Client, Prepared, Provider
from gateway.records import Idempotency, IdempotencyKeyTaken, Session
from gateway.sessions import PROVIDERS, Sessions, new_session_id

_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
# Idempotency-Key: what Stripe and the IETF draft allow, visible ASCII, at most 255 characters.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def created_answer(session: Session, prepared: Prepared) -> dict[str, Any]:
    """The 201 body of `POST /v1/sessions`."""
    answer: dict[str, Any] = session.snapshot()
    del answer["outcome"], answer["updated_at"]
    answer["stream_url"] = f"/v1/sessions/{session.id}/events"
    answer["status_url"] = f"/v1/sessions/{session.id}"
    answer[session.provider] = prepared.public
    return answer


def parse_phone(value: object) -> str | None:
    """An optional E.164 number: `+` and 7–15 digits that libphonenumber finds possible."""
    if value is None:
        return None
    if not isinstance(value, str) or not _E164.fullmatch(value):
        raise BadRequest("invalid_phone", "phone must be an E.164 number such as +15551234567")
    try:
        possible = phonenumbers.is_possible_number(phonenumbers.parse(value, None))
    except phonenumbers.NumberParseException:
        possible = False
    if not possible:
        raise BadRequest("invalid_phone", "phone is not a possible number for its country code")
    return value


def parse_user_ref(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 128 or not value.isprintable():
        raise BadRequest("invalid_user_ref", "user_ref must be a printable string of 1 to 128 characters")
    return value


class Starter:
    """Creates sessions through the enabled providers (the app factory fills `providers`)."""

    def __init__(
        self, sessions: Sessions, metrics: Metrics, auth: Auth | None = None, disk: DiskCap | None = None
    ) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.auth = auth or Auth()  # who may start a session ([auth]; default: anyone)
        self.disk = disk  # the database.max_size_mb cap
        self.providers: dict[str, Provider] = {}
        self._starting: dict[str, asyncio.Future[None]] = {}  # Idempotency-Keys being started here
        # Told of every new session after it is stored (the sandbox's scripted numbers).
        self.on_started: list[Callable[[Session, Prepared], None]] = []
        self.admission: Admission | None = None  # the abuse limits, checked before the provider is called
        self._tickets_starting: set[str] = set()  # hashes of the start tickets whose start runs now

    async def start(
        self,
        provider_name: object,
        phone: object,
        user_ref: object,
        client: Client,
        *,
        remember: tuple[str, str] | None = None,
        credential: Credential = ANONYMOUS,
    ) -> tuple[Session, Prepared]:
        """Start a session; `remember` = (key hash, body hash) stores its Idempotency-Key with it.

        `credential` is what `Auth.identify` made of the request; a ticket is checked against
        this request's phone and user_ref here and stored (used up) with the session.
        """
        if provider_name not in PROVIDERS:
            raise BadRequest("invalid_provider", 'provider must be "truecaller" or "veriphone"')
        checked_phone = parse_phone(phone)
        checked_user_ref = parse_user_ref(user_ref)
        ticket = self._admit(credential, checked_phone, checked_user_ref)
        if ticket is not None and await self.sessions.store.ticket_used(ticket.hash):
            raise Unauthorized("unauthorized", "this start ticket has been used already")
        with self._one_start(ticket):
            if self.disk is not None:
                await self.disk.check()  # before the provider call: a full database stores nothing
            provider = self.providers.get(str(provider_name))
            if provider is None:
                raise Conflict(
                    "provider_disabled", f"the {provider_name} provider is disabled in this gateway's config"
                )
            if self.admission is not None:
                await self.admission.admit_session(client.ip, checked_phone, per_address=credential.kind != "key")
            session_id = new_session_id()
            # The provider is called before the insert, so a provider failure leaves nothing stored.
            prepared = await provider.prepare(
                session_id=session_id, phone=checked_phone, user_ref=checked_user_ref, client=client
            )
            session = await self.sessions.create(
                session_id=session_id,
                provider=provider.name,
                ttl=prepared.ttl,
                phone=checked_phone,
                user_ref=checked_user_ref,
                provider_ref=prepared.provider_ref,
                provider_data=prepared.data,
                idempotency=None
                if remember is None
                else lambda s: Idempotency(remember[0], remember[1], created_answer(s, prepared), s.expires_at),
                ticket=ticket,
            )
            self.metrics.session_created(provider.name)
            for hook in self.on_started:
                hook(session, prepared)
            return session, prepared

    @contextlib.contextmanager
    def _one_start(self, ticket: Admitted | None) -> Iterator[None]:
        """One start per ticket at a time: a racing duplicate is refused here, before it is
        charged to the abuse limits (else it could answer 429 where the truth is 401). The
        insert of the ticket's hash with the session decides between processes."""
        if ticket is None:
            yield
            return
        if ticket.hash in self._tickets_starting:
            raise Unauthorized("unauthorized", "this start ticket has been used already")
        self._tickets_starting.add(ticket.hash)
        try:
            yield
        finally:
            self._tickets_starting.discard(ticket.hash)

    def _admit(self, credential: Credential, phone: str | None, user_ref: str | None) -> Admitted | None:
        """A ticket checked against the request (all but its single use); None for a key or no credential."""
        if credential.kind != "ticket":
            return None
        return self.auth.admit(credential.ticket, user_ref=user_ref, phone=phone, now=self.sessions.clock())

    async def start_once(
        self,
        key: str,
        provider_name: object,
        phone: object,
        user_ref: object,
        client: Client,
        credential: Credential = ANONYMOUS,
    ) -> tuple[dict[str, Any], bool]:
        """Start a session under an Idempotency-Key: (the 201 body, whether it is a replay).

        The same key with the same fields within the session's ttl answers the first body
        again, with no provider call; with other fields it is a 409. Concurrent requests
        with one key wait for the first one instead of calling the provider twice. A request
        with a start ticket is answered again only with the same ticket, still valid: the
        ticket is part of what the key stands for, and its single use is not a replay's concern.
        """
        if not _IDEMPOTENCY_KEY.fullmatch(key):
            raise BadRequest("invalid_idempotency_key", "Idempotency-Key must be 1 to 255 visible ASCII characters")
        key_hash = hashlib.sha256(b"idempotency\x00" + key.encode()).hexdigest()
        request: list[object] = [provider_name, phone, user_ref]
        if credential.kind == "ticket":
            ticket = self._admit(credential, parse_phone(phone), parse_user_ref(user_ref))
            request.append(ticket.hash if ticket else None)
        fields = json.dumps(request, separators=(",", ":"), ensure_ascii=False)
        body_hash = hashlib.sha256(fields.encode()).hexdigest()
        while True:
            stored = await self.sessions.store.idempotent(key_hash, self.sessions.clock())
            if stored is not None:
                if stored.body_hash != body_hash:
                    raise Conflict(
                        "idempotency_key_reused", "this Idempotency-Key was already used with another request body"
                    )
                return stored.answer, True
            running = self._starting.get(key_hash)
            if running is not None:
                await asyncio.wait((running,))  # the first request with this key decides; then look again
                continue
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._starting[key_hash] = done
            try:
                session, prepared = await self.start(
                    provider_name, phone, user_ref, client, remember=(key_hash, body_hash), credential=credential
                )
            except IdempotencyKeyTaken:
                # Another instance on the shared database stored this key first (its provider
                # call and ours both happened; only its session was stored): answer as it did.
                continue
            finally:
                del self._starting[key_hash]
                done.set_result(None)
            return created_answer(session, prepared), False
