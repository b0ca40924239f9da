"""Decoding a Truecaller profile into an outcome, table-driven: odd types, missing fields, mismatched phones."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.outcome import FAILED, VERIFIED, Outcome
from gateway.providers.truecaller.decode import MAX_FIELD_LENGTH, decode_profile

FULL: dict[str, Any] = {
    "id": "a1b2c3",
    "userId": 123,
    "phoneNumbers": [919999999999],
    "name": {"first": "Asha", "last": "Rao"},
    "onlineIdentities": {"email": "a@x.in"},
    "addresses": [{"countryCode": "in", "city": "Pune"}],
    "avatarUrl": "https://example.invalid/a.png",
    "gender": "Female",
    "isActive": True,
    "badges": ["verified"],
    "createdTime": 0,
}
FULL_PROFILE: dict[str, str | None] = {"first_name": "Asha", "last_name": "Rao", "email": "a@x.in", "country": "IN"}
EMPTY_PROFILE: dict[str, str | None] = {"first_name": None, "last_name": None, "email": None, "country": None}


def with_(**changes: Any) -> dict[str, Any]:
    profile = dict(FULL)
    for key, value in changes.items():
        if value is ...:
            profile.pop(key)
        else:
            profile[key] = value
    return profile


VERIFIED_CASES: list[tuple[str, object, dict[str, str | None]]] = [
    ("full, int phone", FULL, FULL_PROFILE),
    ("str phone", with_(phoneNumbers=["919999999999"]), FULL_PROFILE),
    ("str phone with plus", with_(phoneNumbers=["+919999999999"]), FULL_PROFILE),
    ("second number ignored", with_(phoneNumbers=[919999999999, 14155550100]), FULL_PROFILE),
    ("isActive as string", with_(isActive="True"), FULL_PROFILE),
    ("no name", with_(name=...), {**FULL_PROFILE, "first_name": None, "last_name": None}),
    ("no last name", with_(name={"first": "Asha"}), {**FULL_PROFILE, "last_name": None}),
    ("name not a dict", with_(name="Asha Rao"), {**FULL_PROFILE, "first_name": None, "last_name": None}),
    ("blank last name", with_(name={"first": " Asha ", "last": "  "}), {**FULL_PROFILE, "last_name": None}),
    ("name with control chars", with_(name={"first": "As\x00ha\n", "last": "Rao"}), FULL_PROFILE),
    ("no onlineIdentities", with_(onlineIdentities=...), {**FULL_PROFILE, "email": None}),
    ("email not a string", with_(onlineIdentities={"email": 5}), {**FULL_PROFILE, "email": None}),
    ("email without @", with_(onlineIdentities={"email": "nope"}), {**FULL_PROFILE, "email": None}),
    ("email too long", with_(onlineIdentities={"email": "a" * 300 + "@x.in"}), {**FULL_PROFILE, "email": None}),
    ("no addresses", with_(addresses=...), {**FULL_PROFILE, "country": None}),
    ("empty addresses", with_(addresses=[]), {**FULL_PROFILE, "country": None}),
    ("address without country", with_(addresses=[{"city": "Pune"}]), {**FULL_PROFILE, "country": None}),
    ("country not alpha-2", with_(addresses=[{"countryCode": "IND"}]), {**FULL_PROFILE, "country": None}),
    ("country numeric", with_(addresses=[{"countryCode": 91}]), {**FULL_PROFILE, "country": None}),
    ("minimal", {"phoneNumbers": ["14155550100"]}, EMPTY_PROFILE),
]


@pytest.mark.parametrize(("raw", "profile"), [c[1:] for c in VERIFIED_CASES], ids=[c[0] for c in VERIFIED_CASES])
def test_verified(raw: object, profile: dict[str, str | None]) -> None:
    outcome = decode_profile(raw, expected_phone=None)
    expected_phone = "+14155550100" if raw == {"phoneNumbers": ["14155550100"]} else "+919999999999"
    assert outcome == Outcome(VERIFIED, phone=expected_phone, profile=profile)


def test_only_contract_keys_leave_the_decoder() -> None:
    outcome = decode_profile(FULL, expected_phone=None)
    assert outcome.profile is not None
    assert set(outcome.profile) == {"first_name", "last_name", "email", "country"}
    assert "avatarUrl" not in str(outcome) and "Female" not in str(outcome) and "Pune" not in str(outcome)


def test_long_name_is_capped() -> None:
    outcome = decode_profile(with_(name={"first": "x" * 1000}), expected_phone=None)
    assert outcome.profile is not None
    assert outcome.profile["first_name"] == "x" * MAX_FIELD_LENGTH


def test_expected_phone_matches() -> None:
    assert decode_profile(FULL, expected_phone="+919999999999").status == VERIFIED


def test_expected_phone_mismatch() -> None:
    outcome = decode_profile(FULL, expected_phone="+14155550100")
    assert outcome == Outcome(FAILED, "phone_mismatch", phone="+919999999999", profile=None)


MALFORMED: list[tuple[str, object]] = [
    ("None", None),
    ("list", []),
    ("string", "profile"),
    ("empty dict", {}),
    ("no phoneNumbers", with_(phoneNumbers=...)),
    ("phoneNumbers empty", with_(phoneNumbers=[])),
    ("phoneNumbers not a list", with_(phoneNumbers="919999999999")),
    ("phone letters", with_(phoneNumbers=["abc"])),
    ("phone None", with_(phoneNumbers=[None])),
    ("phone too short", with_(phoneNumbers=[12])),
    ("phone too long", with_(phoneNumbers=["1234567890123456"])),
    ("phone huge int", with_(phoneNumbers=[10**5000])),
    ("phone negative", with_(phoneNumbers=[-919999999999])),
    ("phone bool", with_(phoneNumbers=[True])),
    ("phone float", with_(phoneNumbers=[919999999999.0])),
    ("phone leading zero", with_(phoneNumbers=["0919999999999"])),
    ("phone with spaces", with_(phoneNumbers=["91 99999 99999"])),
    ("phone double plus", with_(phoneNumbers=["++919999999999"])),
    ("phone non-ASCII digits", with_(phoneNumbers=["٩١٩٩٩٩٩٩٩٩٩٩"])),
    ("phone dict", with_(phoneNumbers=[{"number": 919999999999}])),
]


@pytest.mark.parametrize("raw", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_is_provider_error(raw: object) -> None:
    assert decode_profile(raw, expected_phone=None) == Outcome(FAILED, "provider_error")
    assert decode_profile(raw, expected_phone="+919999999999") == Outcome(FAILED, "provider_error")


def test_unstorable_text_is_dropped_not_a_failed_write() -> None:
    """A lone surrogate cannot be stored by SQLite: the field is left out, the number still counts."""
    import json

    outcome = decode_profile(
        with_(name={"first": "A\ud800", "last": "Rao"}, onlineIdentities={"email": "x\udfff@y.in"}), expected_phone=None
    )
    assert outcome.status == VERIFIED and outcome.profile is not None
    assert outcome.profile["first_name"] is None and outcome.profile["email"] is None
    assert outcome.profile["last_name"] == "Rao"
    json.dumps(outcome.profile, ensure_ascii=False).encode("utf-8")  # storable
