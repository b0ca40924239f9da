"""Truecaller profile JSON → Outcome; pure, no I/O."""

from __future__ import annotations

import re

from gateway.outcome import FAILED, VERIFIED, Outcome

MAX_FIELD_LENGTH = 200

# E.164: country code never starts with 0, at most 15 digits; 8 is a practical floor.
_PHONE_DIGITS = re.compile(r"[1-9][0-9]{7,14}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def decode_profile(profile: object, *, expected_phone: str | None) -> Outcome:
    """Turn a fetched profile into an outcome; malformed input fails, it never raises."""
    if not isinstance(profile, dict):
        return Outcome(FAILED, "provider_error")
    phone = _phone(profile.get("phoneNumbers"))
    if phone is None:
        return Outcome(FAILED, "provider_error")
    if expected_phone is not None and phone != expected_phone:
        return Outcome(FAILED, "phone_mismatch", phone=phone, profile=None)
    name = profile.get("name")
    identities = profile.get("onlineIdentities")
    return Outcome(
        VERIFIED,
        phone=phone,
        profile={
            "first_name": _text(_get(name, "first")),
            "last_name": _text(_get(name, "last")),
            "email": _email(_get(identities, "email")),
            "country": _country(profile.get("addresses")),
        },
    )


def _phone(numbers: object) -> str | None:
    if not isinstance(numbers, list) or not numbers:
        return None
    first = numbers[0]
    # bool is an int subclass: True must not become "+1".
    if isinstance(first, int) and not isinstance(first, bool):
        # Bounded before str(): a huge int would raise ValueError (int max str digits).
        if not 0 < first < 10**15:
            return None
        digits = str(first)
    elif isinstance(first, str):
        digits = first.removeprefix("+")
    else:
        return None
    # fullmatch on an ASCII class: str.isdigit() would accept other scripts' digits.
    if not _PHONE_DIGITS.fullmatch(digits):
        return None
    return "+" + digits


def _get(container: object, key: str) -> object:
    return container.get(key) if isinstance(container, dict) else None


def _encodable(value: str) -> bool:
    """False for strings with lone surrogates: SQLite could not store them (the outcome would fail)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: object) -> str | None:
    if not isinstance(value, str) or not _encodable(value):
        return None
    cleaned = _CONTROL.sub("", value).strip()[:MAX_FIELD_LENGTH].strip()
    return cleaned or None


def _email(value: object) -> str | None:
    if not isinstance(value, str) or not _encodable(value):
        return None
    text = value.strip()
    # A truncated address would be someone else's address: drop it instead of capping.
    if not text or len(text) > MAX_FIELD_LENGTH or "@" not in text or _CONTROL.search(text):
        return None
    return None if any(c.isspace() for c in text) else text


def _country(addresses: object) -> str | None:
    if not isinstance(addresses, list) or not addresses:
        return None
    code = _get(addresses[0], "countryCode")
    if not isinstance(code, str):
        return None
    upper = code.strip().upper()
    return upper if _COUNTRY.fullmatch(upper) else None
