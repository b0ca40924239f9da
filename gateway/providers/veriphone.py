"""Veriph.One web and mobile verification: create-session, the result endpoint, decoding.

The result is pulled by one background task per session uuid (`Veriphone.settle`): every
request for that uuid — browser redirect or mobile POST, however many at once — awaits the
same task, so one process makes one provider call, and the session's single stored outcome
(`Sessions.finish`) decides every answer. The task is spawned on the gateway, so a client
that disconnects does not cut it short and shutdown waits for it.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.api import start_session
from gateway.clientip import IPNetwork, client_ip, parse_networks
from gateway.errors import ApiError, BadRequest, NotFound, ProviderFailure
from gateway.jsonbody import read_json_object
from gateway.outcome import FAILED, VERIFIED
from gateway.providers.base import Prepared
from gateway.providers.veriphone_api import VeriphoneApi
from gateway.providers.veriphone_status import decode_result
from gateway.sessions import public_ref

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.veriphone")

START_PATH = "/v1/veriphone/start"
DONE_PATH = "/v1/veriphone/done"
RESULT_PATH = "/v1/callbacks/veriphone"
MAX_USER_AGENT = 512
# What a provider session uuid can look like; anything else cannot be one of ours.
_UUID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
# Status and reason words are snake_case: the done page shows nothing else from its URL.
_WORD = re.compile(r"[a-z_]{1,40}")
_NO_STORE = {"cache-control": "no-store", "referrer-policy": "no-referrer"}

Settled = dict[str, Any] | ApiError


def redirect_target(base: str, status: str, reason: str | None) -> str:
    """`base` with `status` (and `reason`, when there is one) appended; its own query and fragment kept.

    Parameters of `base` named status or reason are replaced, so the page reads one value each.
    """
    parts = urlsplit(base)
    kept = [p for p in parts.query.split("&") if p and unquote_plus(p.partition("=")[0]) not in ("status", "reason")]
    added = [("status", status)] + ([("reason", reason)] if reason else [])
    query = "&".join([*kept, urlencode(added)])
    return urlunsplit(parts._replace(path=parts.path or "/", query=query))


def request_client_ip(request: Request, trusted: tuple[IPNetwork, ...]) -> str | None:
    """The client address of a request; X-Forwarded-For lines (there may be several) joined in order."""
    peer = request.client.host if request.client else None
    xff = ",".join(request.headers.getlist("x-forwarded-for")) or None
    return client_ip(peer, xff, trusted)


def phone_from_query(raw: str | None) -> str | None:
    """The phone of a start link; an unencoded `+` arrives as a space, so a leading space means `+`."""
    if raw is None or raw == "":
        return None
    if raw.startswith(" ") and raw[1:].isdigit():
        return "+" + raw[1:]
    return raw


def _single(request: Request, name: str) -> str | None:
    """A query parameter given exactly once; repeats are ambiguous and count as absent."""
    values = request.query_params.getlist(name)
    return values[0] if len(values) == 1 else None


def _optional(request: Request, name: str, code: str) -> str | None:
    """An optional query parameter of a start link: absent or empty is None, repeated is an error."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise BadRequest(code, f"{name} may be given at most once")
    return values[0] if values and values[0] else None


class Veriphone:
    name = "veriphone"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.cfg = gw.settings.providers.veriphone
        self.api = VeriphoneApi(
            gw.http,
            api_base=self.cfg.api_base,
            api_key=self.cfg.api_key,
            api_secret=self.cfg.api_secret,
            timeout=self.cfg.http_timeout,
        )
        self._trusted = parse_networks(gw.settings.server.trusted_proxies)
        self._inflight: dict[str, asyncio.Task[Settled]] = {}
        self._warned_unconfigured = False

    # --- start ---------------------------------------------------------------------------

    async def prepare(self, *, session_id: str, phone: str | None, user_ref: str | None, request: Request) -> Prepared:
        # The sandbox's fake accepts whatever it was given; only a real provider needs real keys.
        if not self.gw.settings.sandbox and not (self.cfg.api_key and self.cfg.api_secret):
            if not self._warned_unconfigured:
                self._warned_unconfigured = True
                log.warning("Veriph.One sessions refused: GATEWAY_VERIPHONE_API_KEY/API_SECRET are not set")
            raise ProviderFailure(
                "provider_unavailable",
                "Veriph.One is not configured on this gateway: the operator must set GATEWAY_VERIPHONE_API_KEY"
                " and GATEWAY_VERIPHONE_API_SECRET",
            )
        try:
            created = await self.api.create_session(
                prefilled_phone=phone,
                user_id=user_ref or public_ref(session_id),
                user_agent=request.headers.get("user-agent", "")[:MAX_USER_AGENT],
                ip_address=request_client_ip(request, self._trusted) or "",
                locale=self.cfg.locale,
            )
        except ProviderFailure as exc:
            log.warning(
                "veriphone create-session failed",
                extra={"session": public_ref(session_id), "code": exc.code, "detail": exc.message},
            )
            raise
        return Prepared(
            ttl=float(self.gw.settings.sessions.ttl),
            public={"session_uuid": created.uuid, "redirect_url": created.redirect_url},
            provider_ref=created.uuid,
            data={"redirect_url": created.redirect_url},
        )

    async def start_by_link(self, request: Request) -> Response:
        """`GET /v1/veriphone/start?phone=&user_ref=`: create a session, send the browser to Veriph.One."""
        try:
            _, prepared = await start_session(
                self.gw,
                self.name,
                phone_from_query(_optional(request, "phone", "invalid_phone")),
                _optional(request, "user_ref", "invalid_user_ref"),
                request,
            )
            target = str(prepared.public["redirect_url"])
        except ApiError as exc:
            target = self._failure(exc.code)
        except Exception as exc:  # the browser must land on a page, never on a bare 500
            log.error("veriphone start failed", exc_info=exc)
            target = self._failure("internal_error")
        return RedirectResponse(target, status_code=307, headers=_NO_STORE)

    # --- result --------------------------------------------------------------------------

    async def settle(self, session_uuid: str) -> dict[str, Any]:
        """The stored outcome for a session uuid, pulling the result from Veriph.One first if still pending."""
        task = self._inflight.get(session_uuid)
        if task is None:
            task = self.gw.spawn(self._settle(session_uuid), name="veriphone-result")
            self._inflight[session_uuid] = task
            task.add_done_callback(lambda done: self._forget(session_uuid, done))
        # shield: a caller that goes away must not cancel the fetch the others are waiting for.
        try:
            settled = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # Shutdown cut the fetch short, not this request: answer it like a provider outage.
                raise ProviderFailure(
                    "provider_unavailable", "the gateway stopped before Veriph.One answered"
                ) from None
            raise
        if isinstance(settled, ApiError):
            raise settled
        return settled

    def _forget(self, session_uuid: str, task: asyncio.Task[Settled]) -> None:
        if self._inflight.get(session_uuid) is task:
            del self._inflight[session_uuid]

    async def _settle(self, session_uuid: str) -> Settled:
        # Expected failures are returned, not raised: they are answers, not bugs to log as such.
        try:
            return await self._fetch_and_finish(session_uuid)
        except ApiError as exc:
            return exc

    async def _fetch_and_finish(self, session_uuid: str) -> dict[str, Any]:
        sessions = self.gw.sessions
        # Read inside the task: a request that saw "pending" just before another task finished
        # starts a new task, and this read then finds the stored outcome instead of calling out.
        session = await sessions.get_by_ref(self.name, session_uuid)
        if session is None:
            raise NotFound("session_not_found", "no Veriph.One session with this uuid")
        ref = public_ref(session.id)
        if session.terminal:
            if session.outcome is None:  # purged after retention: nothing left to answer with
                raise NotFound("session_not_found", "no Veriph.One session with this uuid")
            return session.outcome
        await sessions.progress(session.id, "result_fetching")
        try:
            result = await self.api.get_result(session_uuid)
        except ProviderFailure as exc:
            # The session stays pending: the provider may answer on a retry, else expiry ends it.
            log.warning(
                "veriphone result fetch failed", extra={"session": ref, "code": exc.code, "detail": exc.message}
            )
            raise
        outcome = decode_result(result, prefilled_phone=session.phone)
        if not await sessions.finish(session.id, outcome):
            # Another writer (expiry, another gateway instance) stored first; its outcome stands.
            log.info("veriphone result arrived after the session ended", extra={"session": ref})
        stored = await sessions.get(session.id)
        if stored is None or stored.outcome is None:
            raise NotFound("session_not_found", "the session is gone")
        return stored.outcome

    async def result_redirect(self, request: Request) -> Response:
        """Veriph.One's Result Endpoint: always a 307 to success_url or failure_url from config."""
        try:
            session_uuid = _single(request, "sessionUuid")
            if session_uuid is None or not _UUID.fullmatch(session_uuid):
                target = self._failure("session_not_found")
            else:
                outcome = await self.settle(session_uuid)
                target = self._location(str(outcome["status"]), outcome.get("reason"))
        except ApiError as exc:
            target = self._failure(exc.code)
        except Exception as exc:  # any other answer than 307 leaves the user on a blank page
            log.error("veriphone result endpoint failed", exc_info=exc)
            target = self._failure("internal_error")
        return RedirectResponse(target, status_code=307, headers=_NO_STORE)

    async def result_json(self, request: Request) -> Response:
        """The mobile variant: `{"sessionUuid": "…"}` → the outcome object, or a JSON error."""
        body = await read_json_object(request, fields=("sessionUuid",))
        session_uuid = body.get("sessionUuid")
        if not isinstance(session_uuid, str) or not session_uuid:
            raise BadRequest("invalid_session_uuid", "sessionUuid must be the Veriph.One session uuid, a string")
        if not _UUID.fullmatch(session_uuid):
            raise NotFound("session_not_found", "no Veriph.One session with this uuid")
        outcome = await self.settle(session_uuid)
        return JSONResponse(outcome, headers={"cache-control": "no-store"})

    def _location(self, status: str, reason: object) -> str:
        base = self.cfg.success_url if status == VERIFIED else self.cfg.failure_url
        # Without a configured page, the gateway's own page; relative, so the Host header plays no part.
        return redirect_target(base or DONE_PATH, status, reason if isinstance(reason, str) else None)

    def _failure(self, reason: str) -> str:
        return self._location(FAILED, reason)

    async def done_page(self, request: Request) -> Response:
        """A minimal landing page for when success_url / failure_url are not configured."""
        status = _single(request, "status") or ""
        reason = _single(request, "reason") or ""
        status = status if _WORD.fullmatch(status) else "unknown"
        verified = status == VERIFIED
        headline = "Your phone number is verified." if verified else "Your phone number could not be verified."
        detail = "" if verified else f"<p>Status: <code>{html.escape(status)}</code>"
        if not verified and _WORD.fullmatch(reason):
            detail += f", reason: <code>{html.escape(reason)}</code>"
        page = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Phone verification</title></head><body><h1>{headline}</h1>{detail}"
            "<p>You can close this page.</p></body></html>"
        )
        headers = {**_NO_STORE, "content-security-policy": "default-src 'none'", "x-content-type-options": "nosniff"}
        return HTMLResponse(page, headers=headers)

    def routes(self) -> list[BaseRoute]:
        return [
            Route(START_PATH, self.start_by_link, methods=["GET"]),
            Route(DONE_PATH, self.done_page, methods=["GET"]),
            Route(RESULT_PATH, self.result_redirect, methods=["GET"]),
            Route(RESULT_PATH, self.result_json, methods=["POST"]),
        ]

    async def startup(self) -> None:
        return None
