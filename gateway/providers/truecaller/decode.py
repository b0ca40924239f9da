"""Truecaller's data → typed values and outcomes: callback bodies and the fetched profile; pure, no I/O.

Two callback shapes exist: a token callback `{"requestId", "accessToken", "endpoint"}` and a status
callback `{"requestId", "status"}`. Anything else is a 400 with a stable code. The endpoint
is only type-checked here; `endpoint_guard.check_endpoint` decides whether it may be used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import BadRequest
from gateway.outcome import FAILED, VERIFIED, Outcome

FIELDS = ("requestId", "accessToken", "endpoint", "status")
FLOW_INVOKED = "flow_invoked"
USER_REJECTED = "user_rejected"
USE_ANOTHER_NUMBER = "use_another_number"
REJECTIONS = (USER_REJECTED, USE_ANOTHER_NUMBER)

MAX_TOKEN_LENGTH = 4096
MAX_REQUEST_ID_LENGTH = 128
MAX_STATUS_LENGTH = 64
# Visible ASCII: our nonces are URL-safe, Truecaller's own examples are base64 (with `=`).
_VISIBLE = re.compile(r"[\x21-\x7e]+")
_LOGGABLE_STATUS = re.compile(r"[a-z_]{1,32}")


@dataclass(frozen=True)
class TokenCallback:
    request_id: str
    access_token: str
    endpoint: str


@dataclass(frozen=True)
class StatusCallback:
    request_id: str
    status: str


Callback = TokenCallback | StatusCallback


def parse_callback(body: Mapping[str, object]) -> Callback:
    """Validate a callback body already limited to `FIELDS`; BadRequest with a stable code otherwise."""
    request_id = body.get("requestId")
    if request_id is None:
        raise BadRequest("missing_request_id", "requestId is required")
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID_LENGTH or not _VISIBLE.fullmatch(request_id):
        raise BadRequest("invalid_request_id", "requestId must be a string of 1 to 128 visible ASCII characters")
    has_token = "accessToken" in body
    has_status = "status" in body
    if has_token == has_status:
        raise BadRequest("invalid_callback", "send exactly one of accessToken (with endpoint) and status")
    if has_status:
        if "endpoint" in body:
            raise BadRequest("invalid_callback", "a status callback carries no endpoint")
        status = body["status"]
        if not isinstance(status, str) or not 0 < len(status) <= MAX_STATUS_LENGTH:
            raise BadRequest("invalid_status", "status must be a string of 1 to 64 characters")
        return StatusCallback(request_id, status)
    token = body["accessToken"]
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not _VISIBLE.fullmatch(token):
        raise BadRequest("invalid_access_token", "accessToken must be a string of visible ASCII characters")
    endpoint = body.get("endpoint")
    if endpoint is None:
        raise BadRequest("missing_endpoint", "a token callback needs an endpoint")
    if not isinstance(endpoint, str):
        raise BadRequest("invalid_endpoint", "The profile endpoint was refused: it is not a string.")
    return TokenCallback(request_id, token, endpoint)


def loggable_status(status: str) -> str:
    """The status itself when it is a short snake_case word, else a placeholder (it may carry anything)."""
    return status if _LOGGABLE_STATUS.fullmatch(status) else "<other>"


# -- the profile ----------------------------------------------------------------------
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
