"""Veriph.One's routes: the start link, the Result Endpoint (browser and mobile) and a plain done page."""

from __future__ import annotations

import html
import logging
import re
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.admission import Admission
from gateway.clientip import parse_networks
from gateway.errors import ApiError, BadRequest, NotFound
from gateway.outcome import FAILED, VERIFIED
from gateway.providers.base import Deps
from gateway.providers.veriphone.service import Veriphone
from gateway.starter import Starter
from gateway.web.client import callback_guard, client_of
from gateway.web.jsonbody import read_json_object

log = logging.getLogger("gateway.veriphone")

START_PATH = "/v1/veriphone/start"
DONE_PATH = "/v1/veriphone/done"
RESULT_PATH = "/v1/callbacks/veriphone"
# What a provider session uuid can look like; anything else cannot be one of ours.
_UUID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
# Status and reason words are snake_case: the done page shows nothing else from its URL.
_WORD = re.compile(r"[a-z_]{1,40}")
_NO_STORE = {"cache-control": "no-store", "referrer-policy": "no-referrer"}


def redirect_target(base: str, status: str, reason: str | None) -> str:
    """`base` with `status` (and `reason`, when there is one) appended; its own query and fragment kept.

    Parameters of `base` named status or reason are replaced, so the page reads one value each.
    """
    parts = urlsplit(base)
    kept = [p for p in parts.query.split("&") if p and unquote_plus(p.partition("=")[0]) not in ("status", "reason")]
    added = [("status", status)] + ([("reason", reason)] if reason else [])
    query = "&".join([*kept, urlencode(added)])
    return urlunsplit(parts._replace(path=parts.path or "/", query=query))


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


def routes(veriphone: Veriphone, starter: Starter, admission: Admission | None = None) -> list[BaseRoute]:
    cfg = veriphone.cfg
    trusted = parse_networks(veriphone.settings.server.trusted_proxies)
    admit = callback_guard(admission, trusted)  # callbacks per source address

    async def start_by_link(request: Request) -> Response:
        """`GET /v1/veriphone/start?phone=&user_ref=[&ticket=]`: create a session, send the browser to Veriph.One.

        With `auth.require`, the link needs a start ticket (a link cannot carry an API key).
        """
        try:
            ticket = _optional(request, "ticket", "unauthorized")
            _, prepared = await starter.start(
                veriphone.name,
                phone_from_query(_optional(request, "phone", "invalid_phone")),
                _optional(request, "user_ref", "invalid_user_ref"),
                client_of(request, trusted),
                credential=starter.auth.identify(None if ticket is None else "Ticket " + ticket),
            )
            target = str(prepared.public["redirect_url"])
        except ApiError as exc:
            target = failure(exc.code)
        except Exception as exc:  # the browser must land on a page, never on a bare 500
            log.error("veriphone start failed", exc_info=exc)
            target = failure("internal_error")
        return RedirectResponse(target, status_code=307, headers=_NO_STORE)

    async def result_redirect(request: Request) -> Response:
        """Veriph.One's Result Endpoint: always a 307 to success_url or failure_url from config."""
        try:
            admit(request)  # refused: the failure page with reason=rate_limited, still a 307
            session_uuid = _single(request, "sessionUuid")
            if session_uuid is None or not _UUID.fullmatch(session_uuid):
                target = failure("session_not_found")
            else:
                outcome = await veriphone.settle(session_uuid)
                target = location(str(outcome["status"]), outcome.get("reason"))
        except ApiError as exc:
            target = failure(exc.code)
        except Exception as exc:  # any other answer than 307 leaves the user on a blank page
            log.error("veriphone result endpoint failed", exc_info=exc)
            target = failure("internal_error")
        return RedirectResponse(target, status_code=307, headers=_NO_STORE)

    async def result_json(request: Request) -> Response:
        """The mobile variant: `{"sessionUuid": "…"}` → the outcome object, or a JSON error."""
        admit(request)
        body = await read_json_object(request, fields=("sessionUuid",))
        session_uuid = body.get("sessionUuid")
        if not isinstance(session_uuid, str) or not session_uuid:
            raise BadRequest("invalid_session_uuid", "sessionUuid must be the Veriph.One session uuid, a string")
        if not _UUID.fullmatch(session_uuid):
            raise NotFound("session_not_found", "no Veriph.One session with this uuid")
        outcome = await veriphone.settle(session_uuid)
        return JSONResponse(outcome, headers={"cache-control": "no-store"})

    def location(status: str, reason: object) -> str:
        base = cfg.success_url if status == VERIFIED else cfg.failure_url
        # Without a configured page, the gateway's own page; relative, so the Host header plays no part.
        return redirect_target(base or DONE_PATH, status, reason if isinstance(reason, str) else None)

    def failure(reason: str) -> str:
        return location(FAILED, reason)

    async def done_page(request: Request) -> Response:
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

    return [
        Route(START_PATH, start_by_link, methods=["GET"]),
        Route(DONE_PATH, done_page, methods=["GET"]),
        Route(RESULT_PATH, result_redirect, methods=["GET"]),
        Route(RESULT_PATH, result_json, methods=["POST"]),
    ]


def mount(deps: Deps, starter: Starter) -> tuple[Veriphone, list[BaseRoute]]:
    """The provider for the session service, and its routes: what the app factory calls."""
    provider = Veriphone(deps)
    return provider, routes(provider, starter, deps.admission)
