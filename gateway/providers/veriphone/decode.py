"""Veriph.One verification-result v1.0.0 → Outcome: the status bit table, with no I/O."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import phonenumbers

from gateway.outcome import FAILED, REJECTED, VERIFIED, Outcome

SUCCESS_BIT = 1 << 13
HAS_ERRORS_BIT = 1 << 12
# The seed parser derives has_errors from every bit below the success bit, not only bit 12.
ERRORS_MASK = SUCCESS_BIT - 1

# (bit, StatusFlags field, outcome reason) in bit order; the reason decides precedence.
ERROR_BITS: tuple[tuple[int, str, str], ...] = (
    (1 << 0, "error_destination_mismatch", "destination_mismatch"),
    (1 << 1, "error_origin_mismatch", "origin_mismatch"),
    (1 << 2, "error_invalidated", "invalidated"),
    (1 << 3, "error_expired", "expired"),
    (1 << 4, "error_client_disabled", "client_disabled"),
    (1 << 5, "error_method_tampering", "method_tampering"),
    (1 << 6, "error_too_many_submissions", "too_many_submissions"),
    (1 << 7, "error_exceeded_attempt_quota", "exceeded_attempt_quota"),
    (1 << 8, "error_user_cancelled_attempt", "user_cancelled"),
)
KNOWN_MASK = SUCCESS_BIT | HAS_ERRORS_BIT | sum(bit for bit, _, _ in ERROR_BITS)

_DIGITS = re.compile(r"[0-9]+")
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


@dataclass(frozen=True)
class StatusFlags:
    is_open: bool = False
    was_successful: bool = False
    has_errors: bool = False
    error_destination_mismatch: bool = False
    error_origin_mismatch: bool = False
    error_invalidated: bool = False
    error_expired: bool = False
    error_client_disabled: bool = False
    error_method_tampering: bool = False
    error_too_many_submissions: bool = False
    error_exceeded_attempt_quota: bool = False
    error_user_cancelled_attempt: bool = False
    unknown_bits: int = 0  # bits outside the documented table (9-11, above 13): kept visible, never fatal

    def to_json(self) -> dict[str, bool | int]:
        return asdict(self)


def parse_status(status: int) -> StatusFlags:
    """Decode the status integer like the provider's reference parser, by masks only."""
    if isinstance(status, bool) or not isinstance(status, int) or status < 0:
        raise ValueError("status must be a non-negative integer")
    if status == 0:
        return StatusFlags(is_open=True)
    errors = {name: bool(status & bit) for bit, name, _ in ERROR_BITS}
    return StatusFlags(
        was_successful=bool(status & SUCCESS_BIT),
        has_errors=bool(status & ERRORS_MASK),
        unknown_bits=status & ~KNOWN_MASK,
        **errors,
    )


def split_e164(phone: str) -> tuple[str, str]:
    """`+15551234567` → `("1", "5551234567")`: country code and national significant number."""
    if not isinstance(phone, str) or not _E164.fullmatch(phone):
        raise ValueError("not an E.164 phone number")
    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        raise ValueError("not an E.164 phone number") from None
    if not phonenumbers.is_possible_number(number):
        raise ValueError("not a possible phone number")
    return str(number.country_code), phonenumbers.national_significant_number(number)


def decode_result(result: object, *, prefilled_phone: str | None) -> Outcome:
    """Turn a parsed verification-result v1.0.0 body into the session's outcome; never raises."""
    if not isinstance(result, dict):
        return Outcome(FAILED, "provider_error")
    try:
        attempt = _pick_attempt(result)
    except ValueError:
        return Outcome(FAILED, "provider_error")
    if attempt is None:
        return Outcome(FAILED, "not_completed")

    status = _as_int(attempt.get("status"))
    if status is None:
        return Outcome(FAILED, "provider_error")
    flags = parse_status(status)
    block: dict[str, Any] = {"status": status, "method": _as_int(attempt.get("method")), "flags": flags.to_json()}
    phone = _verified_phone(attempt.get("countryCodeInput"), attempt.get("phoneNumberInput"))

    def outcome(status_: str, reason: str | None) -> Outcome:
        return Outcome(status_, reason, phone=phone, veriphone=block)

    if flags.is_open:
        return outcome(FAILED, "not_completed")
    # A tamper or mismatch signal outranks "the user cancelled": report the most serious reason.
    for bit, _, reason in ERROR_BITS[:-1]:
        if status & bit:
            return outcome(FAILED, reason)
    if flags.error_user_cancelled_attempt:
        return outcome(REJECTED, "user_cancelled")
    if not flags.was_successful or flags.has_errors:
        # Only unassigned bits (or a bare has-errors bit): not a proof of anything.
        return outcome(FAILED, "not_completed")
    if phone is None:
        return outcome(FAILED, "provider_error")
    if prefilled_phone is not None and phone != prefilled_phone:
        return outcome(FAILED, "destination_mismatch")
    return outcome(VERIFIED, None)


def _pick_attempt(result: dict[Any, Any]) -> dict[Any, Any] | None:
    """firstSuccessfulAttempt when it is an object, else the last attempt; ValueError when malformed."""
    first = result.get("firstSuccessfulAttempt")
    if isinstance(first, dict):
        return first
    attempts = result.get("attempts")
    if attempts is None or attempts == []:
        return None
    if not isinstance(attempts, list) or not isinstance(attempts[-1], dict):
        raise ValueError("malformed attempts")
    return attempts[-1]


def _as_int(value: object) -> int | None:
    """A non-negative integer from a JSON number or a numeric string; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value.is_integer() and value >= 0 else None
    if isinstance(value, str):
        text = value.strip()
        return int(text) if len(text) <= 18 and _DIGITS.fullmatch(text) else None
    return None


def _digits(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip().removeprefix("+").replace(" ", "").replace("-", "")
    else:
        return None
    return text if _DIGITS.fullmatch(text) else None


def _verified_phone(country_code: object, national: object) -> str | None:
    cc = _digits(country_code)
    nsn = _digits(national)
    if cc is None or nsn is None or len(cc) > 3 or cc.startswith("0") or len(cc) + len(nsn) > 15:
        return None
    return f"+{cc}{nsn}"
