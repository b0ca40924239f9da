"""Webhooks, pure parts: Standard Webhooks signatures (checked with the `standardwebhooks` package), config, backoff."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.config import settings_from_dict
from gateway.errors import ConfigError
from gateway.webhooks.delivery import MAX_DELAY, backoff, retry_after
from gateway.webhooks.signing import completed_event, headers, new_secret, parse_secret, verify

OUTCOME = {"status": "verified", "reason": None, "provider": "truecaller", "phone": "+15551234567", "user_ref": "u-1"}


def test_a_signed_event_verifies_with_standardwebhooks_under_every_rotation_secret() -> None:
    old, new = new_secret(), new_secret()
    msg_id, kind, body = completed_event("sess-1", OUTCOME, time.time())
    sent = headers([parse_secret(old), parse_secret(new)], msg_id, int(time.time()), body.encode())
    assert len(sent["webhook-signature"].split()) == 2
    for secret in (old, new):
        payload = Webhook(secret).verify(body, sent)
        assert payload["type"] == kind == "session.completed"
        assert payload["data"] == {"session_id": "sess-1", **OUTCOME}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, sent)  # a secret that did not sign
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body.replace("verified", "rejected"), sent)  # tampered body
    stale = headers([parse_secret(old)], msg_id, int(time.time()) - 600, body.encode())
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body, stale)  # correctly signed, but ten minutes old


def test_the_gateways_own_verify_agrees_with_the_package() -> None:
    secret = new_secret()
    key = [parse_secret(secret)]
    msg_id, _, body = completed_event("sess-2", OUTCOME, time.time())
    now = int(time.time())
    sent = headers(key, msg_id, now, body.encode())
    assert verify(key, sent, body.encode(), now)
    assert not verify(key, sent, body.encode() + b" ", now)
    assert not verify(key, sent, body.encode(), now + 301)
    assert not verify([parse_secret(new_secret())], sent, body.encode(), now)
    assert json.loads(body)["timestamp"].endswith("Z")


def test_message_ids_are_unique() -> None:
    assert len({completed_event("s", OUTCOME, 0)[0] for _ in range(1000)}) == 1000


ENV = {"GATEWAY_WEBHOOK_SECRET": new_secret()}


@pytest.mark.parametrize(
    ("webhooks", "env", "key"),
    [
        ({"url": "http://api.example.com/hook"}, ENV, "webhooks.url"),
        ({"url": "ftp://127.0.0.1/hook"}, ENV, "webhooks.url"),
        ({"url": "https://api.example.com/hook"}, {}, "GATEWAY_WEBHOOK_SECRET"),
        (
            {"url": "https://api.example.com/hook"},
            {"GATEWAY_WEBHOOK_SECRET": "whsec_c2hvcnQ="},
            "GATEWAY_WEBHOOK_SECRET",
        ),
        (
            {"url": "https://api.example.com/hook"},
            {"GATEWAY_WEBHOOK_SECRET": "not-a-secret-at-all"},
            "GATEWAY_WEBHOOK_SECRET",
        ),
        (  # rotation: the second secret is cut short; the message names which, shows neither
            {"url": "https://api.example.com/hook"},
            {"GATEWAY_WEBHOOK_SECRET": f"{new_secret()} {new_secret()[:-16]}"},
            "GATEWAY_WEBHOOK_SECRET: secret 2 of 2",
        ),
        (
            {"url": "https://api.example.com/hook"},
            {"GATEWAY_WEBHOOK_SECRET": "whsec_" + "*" * 44},
            "GATEWAY_WEBHOOK_SECRET",
        ),
        ({"timeout": 0}, {}, "webhooks.timeout"),
        ({"max_attempts": 0}, {}, "webhooks.max_attempts"),
        ({"events": ["session.created"]}, {}, "webhooks.events"),
        ({"secrets": ["whsec_x"]}, {}, "webhooks.secrets"),  # never from the file
    ],
)
def test_bad_webhook_config_is_a_one_line_error_without_the_secret(
    webhooks: dict[str, object], env: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"webhooks": webhooks}, env=env)
    message = str(caught.value)
    assert key in message and "\n" not in message
    for secret in " ".join(env.values()).split():
        assert secret not in message and secret.removeprefix("whsec_") not in message


@pytest.mark.parametrize(
    "url", ["https://api.example.com/h", "http://127.0.0.1:9/h", "http://[::1]:9/h", "http://localhost/h"]
)
def test_https_or_a_loopback_receiver_is_accepted(url: str) -> None:
    settings = settings_from_dict({"webhooks": {"url": url}}, env=ENV)
    assert settings.webhooks.url == url and settings.webhooks.secrets == (ENV["GATEWAY_WEBHOOK_SECRET"],)
    rotation = settings_from_dict(
        {"webhooks": {"url": url}}, env={"GATEWAY_WEBHOOK_SECRET": f"{new_secret()} {new_secret()}"}
    )
    assert len(rotation.webhooks.secrets) == 2


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert retry_after("7", now) == 7.0
    assert retry_after(None, now) is None and retry_after("soon", now) is None
    # Digits to str.isdigit() but not to float(): unreadable, not an exception in the worker.
    assert retry_after("\u00b2", now) is None and retry_after("\u0661", now) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert retry_after(date, now) == pytest.approx(30, abs=1)


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    assert backoff(1.0, 1, rng=lambda: 0.0) == 0.5 and backoff(1.0, 1, rng=lambda: 1.0) == 1.0
    assert backoff(1.0, 4, rng=lambda: 1.0) == 8.0
    assert backoff(1.0, 40, rng=lambda: 1.0) == MAX_DELAY
