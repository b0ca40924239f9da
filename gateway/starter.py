"""Starting a verification: validate, let the provider prepare, then store — the one way a session comes to exist."""

from __future__ import annotations

import re

import phonenumbers

from gateway.errors import BadRequest, Conflict
from gateway.metrics import Metrics
from gateway.providers.base import Client, Prepared, Provider
from gateway.records import Session
from gateway.sessions import PROVIDERS, Sessions, new_session_id

_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


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

    def __init__(self, sessions: Sessions, metrics: Metrics) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.providers: dict[str, Provider] = {}

    async def start(
        self, provider_name: object, phone: object, user_ref: object, client: Client
    ) -> tuple[Session, Prepared]:
        if provider_name not in PROVIDERS:
            raise BadRequest("invalid_provider", 'provider must be "truecaller" or "veriphone"')
        checked_phone = parse_phone(phone)
        checked_user_ref = parse_user_ref(user_ref)
        provider = self.providers.get(str(provider_name))
        if provider is None:
            raise Conflict("provider_disabled", f"the {provider_name} provider is disabled in this gateway's config")
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
        )
        self.metrics.session_created(provider.name)
        return session, prepared
