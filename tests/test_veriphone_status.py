"""Decoding Veriph.One status bits into an outcome, table-driven from the documented flags."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.outcome import FAILED, REJECTED, VERIFIED, Outcome
from gateway.providers.veriphone.decode import StatusFlags, decode_result, parse_status, split_e164

ALL_FLAGS = (
    "is_open",
    "was_successful",
    "has_errors",
    "error_destination_mismatch",
    "error_origin_mismatch",
    "error_invalidated",
    "error_expired",
    "error_client_disabled",
    "error_method_tampering",
    "error_too_many_submissions",
    "error_exceeded_attempt_quota",
    "error_user_cancelled_attempt",
)

# status, flags that must be true (all others false), unknown bits, decoded (status, reason) without prefill
STATUS_TABLE: list[tuple[int, set[str], int, tuple[str, str | None]]] = [
    (0, {"is_open"}, 0, (FAILED, "not_completed")),
    (8192, {"was_successful"}, 0, (VERIFIED, None)),
    (4096, {"has_errors"}, 0, (FAILED, "not_completed")),
    (4097, {"has_errors", "error_destination_mismatch"}, 0, (FAILED, "destination_mismatch")),
    (4098, {"has_errors", "error_origin_mismatch"}, 0, (FAILED, "origin_mismatch")),
    (4100, {"has_errors", "error_invalidated"}, 0, (FAILED, "invalidated")),
    (4104, {"has_errors", "error_expired"}, 0, (FAILED, "expired")),
    (4112, {"has_errors", "error_client_disabled"}, 0, (FAILED, "client_disabled")),
    (4128, {"has_errors", "error_method_tampering"}, 0, (FAILED, "method_tampering")),
    (4160, {"has_errors", "error_too_many_submissions"}, 0, (FAILED, "too_many_submissions")),
    (4224, {"has_errors", "error_exceeded_attempt_quota"}, 0, (FAILED, "exceeded_attempt_quota")),
    (4352, {"has_errors", "error_user_cancelled_attempt"}, 0, (REJECTED, "user_cancelled")),
    # a success later flagged: errors win over the success bit
    (8192 | 4128, {"was_successful", "has_errors", "error_method_tampering"}, 0, (FAILED, "method_tampering")),
    # a tamper signal outranks the user's cancel
    (
        4097 | 4352,
        {"has_errors", "error_destination_mismatch", "error_user_cancelled_attempt"},
        0,
        (FAILED, "destination_mismatch"),
    ),
    # bits 9-11 are unassigned: visible, never fatal, never a proof (the seed counts them in has_errors)
    (512, {"has_errors"}, 512, (FAILED, "not_completed")),
    (8192 | 512, {"was_successful", "has_errors"}, 512, (FAILED, "not_completed")),
    (1 << 14, set(), 1 << 14, (FAILED, "not_completed")),
]


def attempt(
    status: object = 8192, cc: object = "1", phone: object = "5551234567", method: object = 20
) -> dict[str, Any]:
    return {
        "uuid": "a-1",
        "countryCodeInput": cc,
        "phoneNumberInput": phone,
        "method": method,
        "status": status,
        "createdAt": "2026-11-22T10:00:00Z",
    }


def result(first: object = None, attempts: object = None) -> dict[str, Any]:
    return {
        "prefilledCountryCode": None,
        "prefilledPhoneNumber": None,
        "createdAt": "2026-11-22T10:00:00Z",
        "closedAt": "2026-11-22T10:01:00Z",
        "userId": "u1",
        "firstSuccessfulAttempt": first,
        "attempts": [] if attempts is None else attempts,
    }


@pytest.mark.parametrize(("status", "true_flags", "unknown", "_decoded"), STATUS_TABLE)
def test_parse_status(status: int, true_flags: set[str], unknown: int, _decoded: object) -> None:
    flags = parse_status(status)
    assert {name for name in ALL_FLAGS if getattr(flags, name)} == true_flags
    assert flags.unknown_bits == unknown
    as_json = flags.to_json()
    assert set(as_json) == {*ALL_FLAGS, "unknown_bits"}
    assert as_json["unknown_bits"] == unknown


@pytest.mark.parametrize(("status", "_flags", "_unknown", "decoded"), STATUS_TABLE)
def test_decode_each_status(status: int, _flags: object, _unknown: object, decoded: tuple[str, str | None]) -> None:
    first = attempt(status) if status == 8192 else None
    outcome = decode_result(result(first, [attempt(status)]), prefilled_phone=None)
    assert (outcome.status, outcome.reason) == decoded
    assert outcome.phone == "+15551234567"
    assert outcome.profile is None
    assert outcome.veriphone == {"status": status, "method": 20, "flags": parse_status(status).to_json()}


@pytest.mark.parametrize("bad", [-1, "8192", 1.0, None, True])
def test_parse_status_rejects_non_int(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_status(bad)


def test_status_flags_default_is_all_false() -> None:
    assert not any(v for k, v in StatusFlags().to_json().items() if k != "unknown_bits")


OK = (VERIFIED, None, "+15551234567")
BAD = (FAILED, "provider_error", None)


def outcome_of(payload: object, prefilled: str | None = None) -> tuple[str, str | None, str | None]:
    outcome = decode_result(payload, prefilled_phone=prefilled)
    assert isinstance(outcome, Outcome)
    return outcome.status, outcome.reason, outcome.phone


@pytest.mark.parametrize(
    ("name", "payload", "prefilled", "expected"),
    [
        (
            "null first, last attempt used",
            result(None, [attempt(8192, phone="5550000000"), attempt(4100), attempt(4352, phone="5559999999")]),
            None,
            (REJECTED, "user_cancelled", "+15559999999"),
        ),
        (
            "null first, last attempt succeeded",
            result(None, [attempt(4104), attempt(8192)]),
            None,
            (VERIFIED, None, "+15551234567"),
        ),
        (
            "first successful attempt wins over later attempts",
            result(attempt(8192), [attempt(8192), attempt(4104, phone="5550000000")]),
            None,
            (VERIFIED, None, "+15551234567"),
        ),
        ("numbers as strings", result(attempt(" 8192", cc="+1", phone="555 123-4567", method="20")), None, OK),
        ("numbers as numbers", result(attempt(8192.0, cc=1, phone=5551234567)), None, OK),
        ("missing status", result(None, [{"countryCodeInput": "1", "phoneNumberInput": "5551234567"}]), None, BAD),
        ("garbage status", result(attempt("8192x")), None, BAD),
        ("negative status", result(attempt(-8192)), None, BAD),
        ("missing phone", result(attempt(8192, phone=None)), None, BAD),
        ("garbage phone", result(attempt(8192, phone="555-CALL-ME")), None, BAD),
        ("too long phone", result(attempt(8192, phone="5" * 15)), None, BAD),
        ("garbage country code", result(attempt(8192, cc="0")), None, BAD),
        ("missing phone on a failure", result(attempt(4104, cc=None)), None, (FAILED, "expired", None)),
        ("missing attempts", {"firstSuccessfulAttempt": None}, None, (FAILED, "not_completed", None)),
        ("empty attempts", result(None, []), None, (FAILED, "not_completed", None)),
        ("attempts not a list", result(None, {"0": attempt()}), None, BAD),
        ("last attempt not a dict", result(None, [attempt(), "x"]), None, BAD),
        ("not a dict", [attempt()], None, BAD),
        ("null body", None, None, BAD),
        ("first is a string", result("x", [attempt(4104)]), None, (FAILED, "expired", "+15551234567")),
        ("open session", result(None, [attempt(0)]), None, (FAILED, "not_completed", "+15551234567")),
        ("user cancelled", result(None, [attempt(4352)]), None, (REJECTED, "user_cancelled", "+15551234567")),
        (
            "prefilled mismatch despite 8192",
            result(attempt(8192, phone="5550000000")),
            "+15551234567",
            (FAILED, "destination_mismatch", "+15550000000"),
        ),
        ("prefilled match", result(attempt(8192)), "+15551234567", (VERIFIED, None, "+15551234567")),
        (
            "italian leading zero kept",
            result(attempt(8192, cc="39", phone="0612345678")),
            "+390612345678",
            (VERIFIED, None, "+390612345678"),
        ),
    ],
)
def test_decode_result(
    name: str, payload: object, prefilled: str | None, expected: tuple[str, str | None, str | None]
) -> None:
    assert outcome_of(payload, prefilled) == expected


def test_decode_result_veriphone_block_with_string_fields() -> None:
    outcome = decode_result(result(attempt("4097", method="garbage")), prefilled_phone=None)
    assert outcome.veriphone is not None
    assert outcome.veriphone["status"] == 4097
    assert outcome.veriphone["method"] is None
    assert outcome.veriphone["flags"]["error_destination_mismatch"] is True


def test_decode_result_malformed_has_no_veriphone_block() -> None:
    assert decode_result("nope", prefilled_phone=None).veriphone is None


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ("+15551234567", ("1", "5551234567")),
        ("+12025550123", ("1", "2025550123")),
        ("+919999999999", ("91", "9999999999")),
        ("+447911123456", ("44", "7911123456")),
        ("+390612345678", ("39", "0612345678")),
        ("+393123456789", ("39", "3123456789")),
    ],
)
def test_split_e164(phone: str, expected: tuple[str, str]) -> None:
    assert split_e164(phone) == expected


@pytest.mark.parametrize(
    "phone", ["", "15551234567", "+1555", "+999123", "+0123456789", "+1 555 123 4567", "+1555123456789012", "abc"]
)
def test_split_e164_rejects_invalid(phone: str) -> None:
    with pytest.raises(ValueError):
        split_e164(phone)
