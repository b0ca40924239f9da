"""The Truecaller deep link and request nonce (start of the flow)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

import pytest

from gateway.config import TruecallerConfig
from gateway.providers.truecaller.service import DEEPLINK_BASE, build_deeplink, new_nonce
from tests.utils import Running

pytestmark = pytest.mark.timeout(10)

REQUIRED = ["type", "requestNonce", "partnerKey", "partnerName", "lang", "privacyUrl", "termsUrl"]
OPTIONAL = ["loginPrefix", "loginSuffix", "ctaPrefix", "ctaColor", "ctaTextColor", "btnShape", "skipOption", "ttl"]
# What may appear in a percent-encoded value: unreserved characters and %XX escapes.
_ENCODED = re.compile(r"(?:[A-Za-z0-9._~-]|%[0-9A-F]{2})*")

FULL = TruecallerConfig(
    partner_key="key/with+odd=chars&more",
    partner_name="Shop & Co #1",
    lang="hi",
    privacy_url="https://shop.example/privacy?a=1&b=2#top",
    terms_url="https://shop.example/terms",
    login_prefix="continue",
    login_suffix="login",
    cta_prefix="use",
    cta_color="#1a73e8",
    cta_text_color="#FFFFFF",
    btn_shape="round",
    skip_option="useanothernum",
    ttl=8000,
)


def raw_pairs(link: str) -> list[tuple[str, str]]:
    base, _, query = link.partition("?")
    assert base == DEEPLINK_BASE
    return [(k, v) for k, _, v in (pair.partition("=") for pair in query.split("&"))]


def test_every_parameter_is_present_in_order_and_round_trips() -> None:
    link = build_deeplink(FULL, "nonce_1234-abcd")
    pairs = raw_pairs(link)
    assert [k for k, _ in pairs] == REQUIRED + OPTIONAL
    assert dict(parse_qsl(urlsplit(link).query, keep_blank_values=True)) == {
        "type": "btmsheet",
        "requestNonce": "nonce_1234-abcd",
        "partnerKey": "key/with+odd=chars&more",
        "partnerName": "Shop & Co #1",
        "lang": "hi",
        "privacyUrl": "https://shop.example/privacy?a=1&b=2#top",
        "termsUrl": "https://shop.example/terms",
        "loginPrefix": "continue",
        "loginSuffix": "login",
        "ctaPrefix": "use",
        "ctaColor": "#1a73e8",
        "ctaTextColor": "#FFFFFF",
        "btnShape": "round",
        "skipOption": "useanothernum",
        "ttl": "8000",
    }


def test_values_are_fully_percent_encoded() -> None:
    raw = dict(raw_pairs(build_deeplink(FULL, "n" * 32)))
    for key, value in raw.items():
        assert _ENCODED.fullmatch(value), (key, value)
    assert raw["ctaColor"] == "%231a73e8"
    assert raw["ctaTextColor"] == "%23FFFFFF"
    assert raw["privacyUrl"] == "https%3A%2F%2Fshop.example%2Fprivacy%3Fa%3D1%26b%3D2%23top"
    assert raw["termsUrl"] == "https%3A%2F%2Fshop.example%2Fterms"
    assert raw["partnerName"] == "Shop%20%26%20Co%20%231"
    assert raw["partnerKey"] == "key%2Fwith%2Bodd%3Dchars%26more"
    assert "#" not in build_deeplink(FULL, "n" * 32)


def test_optional_keys_are_left_out_when_empty() -> None:
    link = build_deeplink(TruecallerConfig(partner_key="k", partner_name="Shop"), "n" * 16)
    assert [k for k, _ in raw_pairs(link)] == REQUIRED


def test_nonces_are_url_safe_within_bounds_and_unique() -> None:
    nonces = {new_nonce() for _ in range(500)}
    assert len(nonces) == 500
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{8,64}", n) for n in nonces)


async def test_session_answer_carries_a_nonce_distinct_from_the_session_id(gw: Running) -> None:
    async with gw.client() as c:
        answers = [(await c.post("/v1/sessions", json={"provider": "truecaller"})).json() for _ in range(3)]
    cfg = gw.settings.providers.truecaller
    for answer in answers:
        block = answer["truecaller"]
        nonce = block["request_nonce"]
        assert re.fullmatch(r"[A-Za-z0-9_-]{8,64}", nonce)
        assert nonce != answer["id"] and nonce not in answer["id"] and answer["id"] not in nonce
        assert block["deeplink"] == build_deeplink(cfg, nonce)
        assert dict(raw_pairs(block["deeplink"]))["requestNonce"] == nonce
    assert len({a["truecaller"]["request_nonce"] for a in answers}) == 3
