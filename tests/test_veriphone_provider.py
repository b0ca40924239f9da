"""The pure parts of the Veriph.One provider module."""

from __future__ import annotations

import pytest

from gateway.providers.veriphone.routes import phone_from_query, redirect_target


@pytest.mark.parametrize(
    ("base", "status", "reason", "expected"),
    [
        ("https://app.example/ok", "verified", None, "https://app.example/ok?status=verified"),
        ("https://app.example", "verified", None, "https://app.example/?status=verified"),
        ("https://app.example/f", "failed", "timeout", "https://app.example/f?status=failed&reason=timeout"),
        (
            "https://app.example/f?a=1&b=x%20y",
            "failed",
            "timeout",
            "https://app.example/f?a=1&b=x%20y&status=failed&reason=timeout",
        ),
        (
            "https://app.example/f?status=old&reason=old&a=1#/route?x=1",
            "failed",
            "expired",
            "https://app.example/f?a=1&status=failed&reason=expired#/route?x=1",
        ),
        ("https://app.example/ok#top", "verified", None, "https://app.example/ok?status=verified#top"),
        ("/v1/veriphone/done", "failed", "internal_error", "/v1/veriphone/done?status=failed&reason=internal_error"),
    ],
)
def test_redirect_target(base: str, status: str, reason: str | None, expected: str) -> None:
    assert redirect_target(base, status, reason) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("+15551234567", "+15551234567"),
        (" 15551234567", "+15551234567"),  # an unencoded "+" in a query string decodes to a space
        (" 1555 123", " 1555 123"),  # anything else is left for the E.164 check to refuse
    ],
)
def test_phone_from_query(raw: str | None, expected: str | None) -> None:
    assert phone_from_query(raw) == expected
