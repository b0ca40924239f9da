"""Veriph.One's server API: create a session, pull its result. Transport errors become ProviderFailure here."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.errors import ApiError, BadRequest, ProviderFailure
from gateway.providers.veriphone.decode import split_e164

CREATE_SESSION_PATH = "/sdk-api/phone-verification/create-session/v1.0.0"
RESULT_PATH = "/sdk-api/phone-verification/verification-result/v1.0.0"
MAX_BODY_BYTES = 64 * 1024
# Looked up, in this order, for the provider's numeric error code in a 4xx body.
ERROR_CODE_KEYS = ("code", "errorCode", "error_code", "status", "statusCode")
_UUID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_NUMERIC = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class CreatedSession:
    uuid: str
    redirect_url: str


class _BodyTooLarge(Exception):
    pass


class VeriphoneApi:
    def __init__(
        self, http: httpx.AsyncClient, *, api_base: str, api_key: str, api_secret: str, timeout: float
    ) -> None:
        self._http = http
        self._api_base = api_base.rstrip("/")
        self._api_key = api_key
        self._api_secret = api_secret
        self._timeout = timeout

    async def create_session(
        self, *, prefilled_phone: str | None, user_id: str, user_agent: str, ip_address: str, locale: str
    ) -> CreatedSession:
        body: dict[str, Any] = {}
        if prefilled_phone is not None:
            try:
                country_code, national = split_e164(prefilled_phone)
            except ValueError:
                raise BadRequest("invalid_phone", "phone must be an E.164 number such as +15551234567") from None
            body["prefilledPhoneNumber"] = {
                "countryCode": country_code,
                "cellphoneNumber": national,
                "userCanEdit": False,
            }
        body["metadata"] = {"userId": user_id, "userAgent": user_agent, "ipAddress": ip_address}
        body["configuration"] = {"locale": locale, "enforceInput": False}

        data = await self._call(
            "create-session",
            "POST",
            CREATE_SESSION_PATH,
            headers={"x-api-key": self._api_key},
            json_body=body,
        )
        uuid = data.get("uuid") if isinstance(data, dict) else None
        redirect_url = data.get("redirectionUrl") if isinstance(data, dict) else None
        if not isinstance(uuid, str) or not _UUID.fullmatch(uuid):
            raise ProviderFailure("provider_unavailable", "Veriph.One create-session answered without a usable uuid")
        if not isinstance(redirect_url, str) or not _is_web_url(redirect_url):
            raise ProviderFailure(
                "provider_unavailable", "Veriph.One create-session answered without a usable redirectionUrl"
            )
        return CreatedSession(uuid=uuid, redirect_url=redirect_url)

    async def get_result(self, session_uuid: str) -> object:
        """The parsed verification-result v1.0.0 body, undecoded (see veriphone_status.decode_result)."""
        return await self._call(
            "verification-result",
            "GET",
            RESULT_PATH,
            headers={"x-api-key": self._api_key, "Authorization": f"Basic {self._api_secret}"},
            params={"sessionUuid": session_uuid},
        )

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> object:
        """One request with a total deadline and a capped body; 2xx → parsed JSON, anything else → ProviderFailure."""
        request_headers = {"Accept": "application/json", **headers}
        try:
            async with asyncio.timeout(self._timeout):
                async with self._http.stream(
                    method,
                    self._api_base + path,
                    headers=request_headers,
                    params=params,
                    json=json_body,
                    timeout=self._timeout,
                    follow_redirects=False,
                ) as response:
                    status = response.status_code
                    try:
                        raw = await _read_capped(response)
                    except _BodyTooLarge:
                        if 400 <= status < 500:
                            raise _rejected(operation, status, None) from None
                        raise ProviderFailure(
                            "provider_unavailable", f"Veriph.One {operation} answered with an oversized body"
                        ) from None
        except (TimeoutError, httpx.TimeoutException):
            raise ProviderFailure("provider_unavailable", f"Veriph.One {operation} timed out") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ProviderFailure(
                "provider_unavailable", f"Veriph.One {operation} unreachable ({type(exc).__name__})"
            ) from None

        if 400 <= status < 500:
            raise _rejected(operation, status, _error_code(raw))
        if not 200 <= status < 300:
            raise ProviderFailure("provider_unavailable", f"Veriph.One {operation} answered HTTP {status}")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise ProviderFailure(
                "provider_unavailable", f"Veriph.One {operation} answered with invalid JSON"
            ) from None


async def _read_capped(response: httpx.Response) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _error_code(raw: bytes) -> int | None:
    """The provider's numeric error code from a 4xx body, if it carries one where we look."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    candidates = [data]
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        candidates.append(data["error"])
    for candidate in candidates:
        if not isinstance(candidate, dict):
            continue
        for key in ERROR_CODE_KEYS:
            value = candidate.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**9:
                return value
            if isinstance(value, str) and _NUMERIC.fullmatch(value.strip()):
                return int(value.strip())
    return None


# Veriph.One's codes for a number it will not verify: the caller's input, so a 400, not a 502.
_PHONE_CODES = {20000: "its country code", 20001: "the number"}


def _rejected(operation: str, status: int, code: int | None) -> ApiError:
    if code in _PHONE_CODES:
        return BadRequest("invalid_phone", f"Veriph.One refused {_PHONE_CODES[code]} (error code {code})")
    # Only the HTTP status and a bounded integer are echoed: a body may quote the request, key included.
    detail = f"HTTP {status}" if code is None else f"HTTP {status}, error code {code}"
    return ProviderFailure("provider_rejected", f"Veriph.One {operation} rejected the request ({detail})")


def _is_web_url(value: str) -> bool:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        return False
    return url.scheme in ("http", "https") and bool(url.host)
