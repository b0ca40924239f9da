"""Truecaller mobile-web verification: the deep link, the server callback, the profile fetch."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.requests import Request
from starlette.routing import BaseRoute

from gateway.config import TruecallerConfig
from gateway.providers.base import Prepared

if TYPE_CHECKING:
    from gateway.app import Gateway

DEEPLINK_BASE = "truecallersdk://truesdk/web_verify"


def new_nonce() -> str:
    """A request nonce: 32 URL-safe characters from the CSPRNG (Truecaller allows 8–64)."""
    return secrets.token_urlsafe(24)


def build_deeplink(cfg: TruecallerConfig, nonce: str) -> str:
    """The documented deep link; every value percent-encoded, optional keys only when set."""
    params: list[tuple[str, str]] = [
        ("type", "btmsheet"),
        ("requestNonce", nonce),
        ("partnerKey", cfg.partner_key),
        ("partnerName", cfg.partner_name),
        ("lang", cfg.lang),
        ("privacyUrl", cfg.privacy_url),
        ("termsUrl", cfg.terms_url),
    ]
    optional = [
        ("loginPrefix", cfg.login_prefix),
        ("loginSuffix", cfg.login_suffix),
        ("ctaPrefix", cfg.cta_prefix),
        ("ctaColor", cfg.cta_color),
        ("ctaTextColor", cfg.cta_text_color),
        ("btnShape", cfg.btn_shape),
        ("skipOption", cfg.skip_option),
        ("ttl", str(cfg.ttl) if cfg.ttl else ""),
    ]
    params += [(k, v) for k, v in optional if v]
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params)
    return f"{DEEPLINK_BASE}?{query}"


class Truecaller:
    name = "truecaller"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.cfg = gw.settings.providers.truecaller

    async def prepare(
        self, *, session_id: str, phone: str | None, user_ref: str | None, request: Request
    ) -> Prepared:
        nonce = new_nonce()
        ttl = min(float(self.gw.settings.sessions.ttl), self.cfg.callback_timeout)
        return Prepared(
            ttl=ttl,
            provider_ref=nonce,
            public={"request_nonce": nonce, "deeplink": build_deeplink(self.cfg, nonce)},
        )

    def routes(self) -> list[BaseRoute]:
        return []

    async def startup(self) -> None:
        return None
