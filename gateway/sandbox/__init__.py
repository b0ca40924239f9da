"""Sandbox mode: fake providers inside the gateway, so the whole flow runs with no credentials.

`gateway serve --sandbox` binds its socket first (so the real port is known, port 0 included),
then `apply_sandbox` points both providers at the gateway itself, and `create_app` mounts
`sandbox_routes`:

    /sandbox/truecaller/dialog?deeplink=…   a person plays the Truecaller app (HTML)
    /sandbox/truecaller/v1/default          the fake profile host (gateway/providers/truecaller/fake.py)
    /sandbox/veriphone/verify/{uuid}        a person plays the Veriph.One web flow (HTML)
    /sandbox/veriphone/sdk-api/…            the fake Veriph.One API (gateway/providers/veriphone/fake.py)
    /sandbox/webhooks/receive               a fake site backend: receives and verifies the webhooks
    /sandbox/webhooks                       what it received (JSON), listed on /demo

Everything goes over real HTTP, exactly as in production: the dialog makes the gateway
receive Truecaller's server callbacks, the gateway fetches the profile from the fake host and
pulls Veriph.One results with the per-process random key. Nothing here is mounted without
--sandbox. The pages put request data only through `html.escape`, run no script at all and
are served with a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import ipaddress
import json
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import phonenumbers
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from gateway.auth import make_ticket
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.outcome import rfc3339
from gateway.providers.base import Prepared
from gateway.providers.truecaller.fake import PROFILE_PATH, create_fake_truecaller, post_callback, post_status
from gateway.providers.truecaller.routes import CALLBACK_PATH as TRUECALLER_CALLBACK_PATH
from gateway.providers.veriphone.fake import DEFAULT_PHONE as DEFAULT_VERIPHONE_PHONE
from gateway.providers.veriphone.fake import create_fake_veriphone, fake_state
from gateway.providers.veriphone.routes import RESULT_PATH as VERIPHONE_RESULT_PATH
from gateway.records import Session
from gateway.sandbox.pages import Field, html_page
from gateway.sessions import public_ref
from gateway.web.context import Gateway
from gateway.web.demo import DEMO_PATH
from gateway.webhooks.signing import new_secret, parse_secret, verify

log = logging.getLogger("gateway.sandbox")

TRUECALLER_MOUNT = "/sandbox/truecaller"
VERIPHONE_MOUNT = "/sandbox/veriphone"
DIALOG_PATH = TRUECALLER_MOUNT + "/dialog"
WEBHOOKS_LIST = "/sandbox/webhooks"
WEBHOOKS_RECEIVE = WEBHOOKS_LIST + "/receive"
MAX_DELIVERIES = 50
MAX_WEBHOOK_BYTES = 64 * 1024  # an outcome event is a few hundred bytes
VERIFY_PATH = VERIPHONE_MOUNT + "/verify/{session_uuid}"  # the fake's redirectionUrl lands here

# What the person is shown prefilled: realistic, valid numbers (phonenumbers agrees).
DEFAULT_TRUECALLER_PHONE = "+919876543210"
DEFAULT_PARTNER_NAME = "Gateway sandbox"
SANDBOX_PARTNER_KEY = "sandbox"  # the deep link shows it; a real key never goes into a fake flow

# Veriph.One outcomes a person can pick: (status bits, button label). See PROVIDERS.md §4.
VERIPHONE_CHOICES: tuple[tuple[int, str], ...] = (
    (8192, "Verify successfully"),
    (4352, "Cancel the attempt"),
    (4097, "Verify another number (destination mismatch)"),
    (4098, "OTP sent from another number (origin mismatch)"),
    (4104, "Let it expire"),
    (4160, "Too many submissions"),
    (0, "Leave without finishing"),
)
VERIPHONE_METHODS: tuple[tuple[int, str], ...] = (
    (20, "OTP by SMS"),
    (21, "OTP by WhatsApp"),
    (10, "Inverse OTP by SMS"),
    (11, "Inverse OTP by WhatsApp"),
    (30, "OTP by robocall"),
)

MAX_FORM_BYTES = 8 * 1024
MAX_DEEPLINK = 4096
# Fakes remember every token, session and request (tests read them); a long-running sandbox
# keeps only this many of each, the oldest dropped (a session lives minutes at most).
KEEP = 500
_NONCE = re.compile(r"[A-Za-z0-9._~+/=-]{8,64}")
_UUID = re.compile(r"[A-Za-z0-9-]{1,64}")
_NAME = re.compile(r"[^\x00-\x1f<>]{0,40}")


# --- settings ----------------------------------------------------------------------------


def loopback_base(host: str, port: int) -> str:
    """`http://host:port` by which the gateway reaches itself; a wildcard address becomes loopback."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"http://{host}:{port}"  # a host name: it resolves to where we listen
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    shown = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{shown}:{port}"


def apply_sandbox(settings: Settings, address: tuple[str, int] | None = None) -> Settings:
    """Settings for sandbox mode: providers pointed at the gateway itself, demo on, loud in the log.

    `address` is where the server socket is bound (`sock.getsockname()[:2]`); without it the
    configured host and port are used, which cannot work for port 0.
    """
    host, port = address if address is not None else (settings.server.host, settings.server.port)
    if port == 0:
        raise ConfigError(
            "--sandbox: the fake providers need the real port; bind the socket first (gateway.workers.bind)"
        )
    base = loopback_base(host, port)
    authority = urlsplit(base).netloc
    tc = settings.providers.truecaller
    truecaller = dataclasses.replace(
        tc,
        partner_key=SANDBOX_PARTNER_KEY,
        partner_name=tc.partner_name or DEFAULT_PARTNER_NAME,
        require_https=False,
        require_public_ip=False,
        profile_hosts=(authority,),
    )
    veriphone = dataclasses.replace(
        settings.providers.veriphone,
        api_base=base + VERIPHONE_MOUNT,
        # Random per process and never written anywhere: the fake checks them like the real API.
        api_key=secrets.token_urlsafe(24),
        api_secret=secrets.token_urlsafe(32),
        # Relative, so the browser stays on whatever host name it used; /demo resumes a
        # same-tab flow, and a popup is closed by the page that opened it.
        success_url=DEMO_PATH,
        failure_url=DEMO_PATH,
    )
    providers = dataclasses.replace(settings.providers, truecaller=truecaller, veriphone=veriphone)
    server = dataclasses.replace(settings.server, port=port, demo=True)
    webhooks = settings.webhooks
    if not webhooks.url:
        # The sandbox is its own site backend: the demo page shows each webhook it received.
        # The secret is made per process and never written anywhere.
        webhooks = dataclasses.replace(
            webhooks, url=base + WEBHOOKS_RECEIVE, secrets=webhooks.secrets or (new_secret(),)
        )
    log.warning(
        "SANDBOX MODE: fake Truecaller and Veriph.One run inside this gateway, nothing is really verified;"
        " never use this in production. Try it: %s%s",
        base,
        DEMO_PATH,
    )
    if webhooks is not settings.webhooks:
        log.warning("SANDBOX MODE: outcome webhooks go to this gateway's own fake receiver, listed on %s", DEMO_PATH)
    return dataclasses.replace(settings, server=server, providers=providers, webhooks=webhooks, sandbox=True)


def sandbox_base(settings: Settings) -> str:
    """The gateway's own base URL, as `apply_sandbox` wrote it into the Veriph.One api_base."""
    api_base = settings.providers.veriphone.api_base
    if not settings.sandbox or not api_base.endswith(VERIPHONE_MOUNT):
        raise ConfigError("sandbox routes need settings made by gateway.sandbox.apply_sandbox")
    return api_base.removesuffix(VERIPHONE_MOUNT)


def sandbox_routes(gateway: Gateway) -> list[BaseRoute]:
    """The fake providers and the pages where a person plays them; mounted only with --sandbox."""
    sandbox = Sandbox(gateway)
    gateway.starter.on_started.append(sandbox.script)
    return sandbox.routes()


# Scripted numbers: a Truecaller session created with one of these phones plays itself, with
# no click, so a site's own end-to-end tests can run against the sandbox (README lists them).
# Each value: what the fake user and the fake Truecaller do.
SCRIPTED: dict[str, str] = {
    "+15005550001": "verified",  # the user taps Continue; the profile has this number
    "+15005550002": "user_rejected",  # the user rejects
    "+15005550003": "use_another_number",  # the user picks "use another number"
    "+15005550004": "phone_mismatch",  # the profile comes back with another number
    "+15005550005": "slow_provider",  # the profile host answers after 2 s; then verified
    "+15005550006": "provider_5xx",  # the profile host answers 500 every time: failed / provider_error
    "+15005550007": "expired",  # nobody answers: the session expires at its ttl
}
# Veriph.One: the fake records this attempt status (as its page would) and the user's
# browser comes back to the Result Endpoint, which pulls the result.
SCRIPTED_VERIPHONE: dict[str, int] = {
    "+15005550011": 8192,  # verified
    "+15005550012": 4352,  # the user cancels the attempt
    "+15005550013": 4097,  # another number was verified: destination mismatch
    "+15005550014": 4104,  # the attempt expires at the provider
}
SCRIPT_PAUSE = 0.2  # seconds before a scripted user acts: a page has time to open its stream
FAULTS_MOUNT = "/sandbox/faults"
TICKET_PATH = "/sandbox/ticket"
SLOW_PROFILE_SECONDS = 2.0


# --- the fakes and the pages ---------------------------------------------------------------


@dataclass(frozen=True)
class DeepLink:
    """What the dialog needs from a `truecallersdk://truesdk/web_verify?…` link."""

    raw: str
    nonce: str
    partner_name: str
    lang: str


def parse_deeplink(raw: str | None) -> DeepLink | None:
    """The deep link if it is one of ours (each parameter at most once, a sane nonce), else None."""
    if not raw or len(raw) > MAX_DEEPLINK:
        return None
    parts = urlsplit(raw)
    if (parts.scheme, parts.netloc, parts.path) != ("truecallersdk", "truesdk", "/web_verify"):
        return None
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True, max_num_fields=40)
    except ValueError:
        return None
    if any(len(values) != 1 for values in query.values()):
        return None
    params = {key: values[0] for key, values in query.items()}
    nonce = params.get("requestNonce", "")
    if not _NONCE.fullmatch(nonce):
        return None
    return DeepLink(raw, nonce, params.get("partnerName", "") or DEFAULT_PARTNER_NAME, params.get("lang", "en"))


def e164(raw: str) -> str | None:
    """A valid phone number in E.164 form, or None."""
    try:
        number = phonenumbers.parse(raw.strip(), None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


# Plays Truecaller's server: (http, callback URL, requestId, status or token) → the gateway's answer.
Sender = Callable[[httpx.AsyncClient, str, str, str], Awaitable[httpx.Response]]


def _trim(store: MutableMapping[str, Any] | list[Any]) -> None:
    excess = len(store) - KEEP
    if excess <= 0:
        return
    if isinstance(store, list):
        del store[:excess]
    else:
        for key in list(store)[:excess]:
            del store[key]


class Sandbox:
    """The fake provider apps, their state, and the two human pages."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.base = sandbox_base(gw.settings)
        self.truecaller_app, self.truecaller = create_fake_truecaller()
        vp = gw.settings.providers.veriphone
        self.veriphone_app = create_fake_veriphone(vp.api_key, vp.api_secret, public_url=self.base + VERIPHONE_MOUNT)
        self.veriphone = fake_state(self.veriphone_app)
        # The provider's documented oddities, on by default so the gateway always meets them.
        self.veriphone.numbers_as_strings = True
        self.veriphone.result_http_status = 201
        # The fake site backend: the keys it verifies with, and the newest deliveries first.
        self.webhook_keys = [parse_secret(secret) for secret in gw.settings.webhooks.secrets]
        self.deliveries: deque[dict[str, Any]] = deque(maxlen=MAX_DELIVERIES)

    def routes(self) -> list[BaseRoute]:
        # The pages come before the mounts, which would otherwise swallow their paths.
        return [
            Route(DIALOG_PATH, self.dialog, methods=["GET"]),
            Route(DIALOG_PATH, self.dialog_action, methods=["POST"]),
            Route(VERIFY_PATH, self.verify_page, methods=["GET"]),
            Route(VERIFY_PATH, self.verify_action, methods=["POST"]),
            Route(FAULTS_MOUNT + "/slow", self.slow_profile, methods=["GET"]),
            Route(FAULTS_MOUNT + "/error", self.failing_profile, methods=["GET"]),
            Route(WEBHOOKS_RECEIVE, self.receive_webhook, methods=["POST"]),
            Route(WEBHOOKS_LIST, self.list_webhooks, methods=["GET"]),
            Route(TICKET_PATH, self.mint_ticket, methods=["POST"]),
            Mount(TRUECALLER_MOUNT, app=self.truecaller_app),
            Mount(VERIPHONE_MOUNT, app=self.veriphone_app),
        ]

    def _forget_old(self) -> None:
        _trim(self.truecaller.users)
        _trim(self.truecaller.requests)
        _trim(self.veriphone.sessions)
        _trim(self.veriphone.create_calls)
        _trim(self.veriphone.result_calls)

    # --- the fake site backend ---------------------------------------------------------------

    async def mint_ticket(self, request: Request) -> Response:
        """What a site's backend does for its page: a start ticket for this phone and user_ref (60 s).

        Signed with the first GATEWAY_TICKET_SECRET; the demo asks for one when `auth.require` is on.
        """
        keys = self.gw.settings.auth.ticket_secrets
        if not keys:
            return JSONResponse({"error": {"code": "no_ticket_secret", "message": "set GATEWAY_TICKET_SECRET"}}, 404)
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        fields = {k: v if isinstance(v, str) and v else None for k, v in body.items() if k in ("phone", "user_ref")}
        ticket = make_ticket(keys[0], exp=int(time.time()) + 60, **fields)
        return Response(ticket, media_type="text/plain", headers={"cache-control": "no-store"})

    # --- scripted numbers ----------------------------------------------------------------

    def script(self, session: Session, prepared: Prepared) -> None:
        """After a session is stored: if its phone is a scripted number, play the user and Truecaller."""
        phone = session.phone or ""
        if session.provider == "veriphone" and phone in SCRIPTED_VERIPHONE:
            uuid = str(prepared.public["session_uuid"])
            self.gw.background.spawn(self._play_veriphone(uuid, phone), name="sandbox-script")
            return
        play = SCRIPTED.get(phone)
        if play is None or play == "expired" or session.provider != "truecaller":
            return
        nonce = str(prepared.public["request_nonce"])
        self.gw.background.spawn(self._play(play, nonce, session.phone), name="sandbox-script")

    async def _play_veriphone(self, session_uuid: str, phone: str) -> None:
        await asyncio.sleep(SCRIPT_PAUSE)
        self.veriphone.complete(session_uuid, status=SCRIPTED_VERIPHONE[phone], method=20, phone=phone)
        # The user's browser comes back: the gateway's Result Endpoint pulls the result.
        await self.gw.http.get(self.base + VERIPHONE_RESULT_PATH, params={"sessionUuid": session_uuid})

    async def _play(self, play: str, nonce: str, phone: str | None) -> None:
        await asyncio.sleep(SCRIPT_PAUSE)  # a scripted user, like a real one, takes a moment
        if play in ("user_rejected", "use_another_number"):
            await self._callback(post_status, nonce, play)
            return
        profile_phone = "+15005550099" if play == "phone_mismatch" or phone is None else phone
        token = self.truecaller.issue_token(profile_phone, "Sandbox", "User", None, "US")
        path = {"slow_provider": "/slow", "provider_5xx": "/error"}.get(play)
        endpoint = self.base + (FAULTS_MOUNT + path if path else TRUECALLER_MOUNT + PROFILE_PATH)

        async def send(http: httpx.AsyncClient, url: str, request_id: str, token: str) -> httpx.Response:
            return await post_callback(http, url, request_id, token, endpoint)

        await self._callback(send, nonce, token)

    async def slow_profile(self, request: Request) -> Response:
        """A slow Truecaller profile host: the real fake's answer, 2 s late."""
        await asyncio.sleep(SLOW_PROFILE_SECONDS)
        auth = request.headers.get("authorization", "")
        answer = await self.gw.http.get(
            self.base + TRUECALLER_MOUNT + PROFILE_PATH, headers={"authorization": auth}
        )
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    async def failing_profile(self, request: Request) -> Response:
        """A Truecaller profile host that is down: 500 on every request."""
        return JSONResponse({"status": 50000, "message": "sandbox: provider error on purpose"}, status_code=500)

    async def receive_webhook(self, request: Request) -> Response:
        """Verify the Standard Webhooks signature and timestamp as a receiver must; keep a summary.

        Every POST is listed, a refused one too (401, `signature_verified` false, nothing read
        from its body). The summary holds no personal data: no phone, no names, and the
        session only by its public ref.
        """
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_WEBHOOK_BYTES:
                return Response(status_code=413)
        verified = verify(self.webhook_keys, dict(request.headers), body, time.time())
        event: Any = {}
        if verified:
            try:
                event = json.loads(body)
            except ValueError:
                event = {}
        event = event if isinstance(event, dict) else {}
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        session_id = data.get("session_id")
        self.deliveries.appendleft(
            {
                "id": request.headers.get("webhook-id", "")[:64],
                "type": _short(event.get("type")),
                "status": _short(data.get("status")),
                "reason": _short(data.get("reason")),
                "session": public_ref(session_id) if isinstance(session_id, str) else None,
                "signature_verified": verified,
                "received_at": rfc3339(time.time()),
            }
        )
        return Response(status_code=204 if verified else 401)

    async def list_webhooks(self, request: Request) -> Response:
        """What the fake site backend received, newest first (the demo page lists it)."""
        return JSONResponse({"deliveries": list(self.deliveries)}, headers={"cache-control": "no-store"})

    # --- Truecaller ------------------------------------------------------------------------

    async def dialog(self, request: Request) -> Response:
        """The Truecaller app's bottom sheet; opening it sends `flow_invoked`, as the real app does."""
        link = parse_deeplink(request.query_params.get("deeplink"))
        if link is None:
            return _message(400, "Not a Truecaller request", "The deeplink parameter is not a web_verify deep link.")
        answer = await self._callback(post_status, link.nonce, "flow_invoked")
        if answer is not None:
            return answer
        session = await self.gw.sessions.get_by_ref("truecaller", link.nonce)
        phone = session.phone if session is not None and session.phone else DEFAULT_TRUECALLER_PHONE
        return _dialog(link, phone, "Asha", "Rao", "", error=None)

    async def dialog_action(self, request: Request) -> Response:
        """Continue → token + callback; Use another number / Reject → the matching status callback."""
        form = await _form(request)
        if isinstance(form, Response):
            return form
        link = parse_deeplink(form.get("deeplink"))
        if link is None:
            return _message(400, "Not a Truecaller request", "The form lost its deep link; open the dialog again.")
        action = form.get("action")
        if action == "reject":
            return await self._callback(post_status, link.nonce, "user_rejected") or _done("You rejected the request.")
        if action == "another":
            status = "use_another_number"
            return await self._callback(post_status, link.nonce, status) or _done("You chose another number.")
        if action != "continue":
            return _message(400, "Unknown action", "Use one of the dialog's buttons.")
        first, last, email = form.get("first", ""), form.get("last", ""), form.get("email", "").strip()
        phone = e164(form.get("phone", ""))
        problem = None
        if phone is None:
            problem = "Enter a valid phone number in international format, e.g. +919876543210."
        elif not (_NAME.fullmatch(first) and _NAME.fullmatch(last)) or len(email) > 80:
            problem = "Names and e-mail must be short plain text."
        if problem is not None or phone is None:
            return _dialog(link, form.get("phone", ""), first, last, email, error=problem, status_code=422)
        country = phonenumbers.region_code_for_number(phonenumbers.parse(phone, None))
        self._forget_old()
        token = self.truecaller.issue_token(phone, first or None, last or None, email or None, country)
        endpoint = self.base + TRUECALLER_MOUNT + PROFILE_PATH

        async def send(http: httpx.AsyncClient, url: str, request_id: str, token: str) -> httpx.Response:
            return await post_callback(http, url, request_id, token, endpoint)

        return await self._callback(send, link.nonce, token) or _done(
            "The gateway received the callback and is fetching your profile from the sandbox profile host."
        )

    async def _callback(self, send: Sender, nonce: str, value: str) -> Response | None:
        """Play Truecaller's server over real HTTP; None when the gateway accepted, else a page saying why."""
        try:
            answer = await send(self.gw.http, self.base + TRUECALLER_CALLBACK_PATH, nonce, value)
        except httpx.HTTPError as exc:
            log.warning("sandbox: the truecaller callback did not reach the gateway (%s)", type(exc).__name__)
            return _message(502, "Gateway unreachable", "The sandbox could not reach the gateway's callback.")
        if answer.status_code == 404:
            return _message(404, "Request not pending", "This request expired or was already answered.")
        if not answer.is_success:
            log.warning("sandbox: the gateway refused a truecaller callback (HTTP %d)", answer.status_code)
            return _message(502, "Callback refused", f"The gateway answered HTTP {answer.status_code}.")
        return None

    # --- Veriph.One ------------------------------------------------------------------------

    async def verify_page(self, request: Request) -> Response:
        """Veriph.One's hosted page: pick the method, the number and what happens."""
        session_uuid = request.path_params["session_uuid"]
        session = self.veriphone.sessions.get(session_uuid) if _UUID.fullmatch(session_uuid) else None
        if session is None:
            return _message(404, "Unknown session", "This Veriph.One session does not exist.")
        phone = f"+{session.prefilled[0]}{session.prefilled[1]}" if session.prefilled else DEFAULT_VERIPHONE_PHONE
        return _verify(phone, prefilled=session.prefilled is not None, error=None)

    async def verify_action(self, request: Request) -> Response:
        """Record the attempt on the fake, then send the browser to the gateway's Result Endpoint."""
        session_uuid = request.path_params["session_uuid"]
        session = self.veriphone.sessions.get(session_uuid) if _UUID.fullmatch(session_uuid) else None
        if session is None:
            return _message(404, "Unknown session", "This Veriph.One session does not exist.")
        form = await _form(request)
        if isinstance(form, Response):
            return form
        status = _choice(form.get("status"), VERIPHONE_CHOICES)
        method = _choice(form.get("method"), VERIPHONE_METHODS)
        phone = e164(form.get("phone", ""))
        if status is None or method is None:
            return _message(400, "Unknown choice", "Use one of the page's buttons.")
        if phone is None:
            error = "Enter a valid phone number in international format, e.g. +14155550100."
            return _verify(form.get("phone", ""), prefilled=session.prefilled is not None, error=error, status_code=422)
        self._forget_old()
        self.veriphone.complete(session_uuid, status=status, method=method, phone=phone)
        # What Veriph.One does after the flow: the browser goes to the partner's Result Endpoint.
        target = f"{VERIPHONE_RESULT_PATH}?sessionUuid={quote(session_uuid, safe='')}"
        return RedirectResponse(target, status_code=303, headers=dict(_HEADERS))


_HEADERS: Mapping[str, str] = {
    "cache-control": "no-store",
    # The dialog URL holds the request nonce: never hand it to another origin.
    "referrer-policy": "same-origin",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


def _short(value: object) -> str | None:
    """A short string from a verified event for the list, or None."""
    return value[:40] if isinstance(value, str) else None


def _choice(raw: str | None, choices: tuple[tuple[int, str], ...]) -> int | None:
    values = {str(value): value for value, _ in choices}
    return values.get(raw or "")


async def _form(request: Request) -> dict[str, str] | Response:
    """A small urlencoded form from this very origin (a foreign page must not drive the sandbox)."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        return _message(403, "Wrong origin", "The sandbox accepts its own forms only.")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return _message(415, "Not a form", "Expected an HTML form submission.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return _message(413, "Form too large", "The form is limited to 8 KiB.")
    try:
        parsed = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return _message(400, "Bad form", "The form could not be read.")
    return {key: values[0] for key, values in parsed.items()}


def _message(status_code: int, title: str, text: str) -> Response:
    body = f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
    return html_page(title, body, status_code=status_code, headers=_HEADERS)


def _done(text: str) -> Response:
    body = f"<h1>Done</h1><p>{html.escape(text)}</p><p class=muted>You can close this window.</p>"
    return html_page("Done", body, headers=_HEADERS)


def _dialog(
    link: DeepLink, phone: str, first: str, last: str, email: str, *, error: str | None, status_code: int = 200
) -> Response:
    partner = html.escape(link.partner_name)
    fields = [
        Field("phone", "Your number", phone, "tel"),
        Field("first", "First name", first, "text"),
        Field("last", "Last name", last, "text"),
        Field("email", "E-mail (optional)", email, "email"),
    ]
    body = (
        '<div class="sheet"><p class="brand">Truecaller <span class="tag">sandbox</span></p>'
        f"<h1>{partner}</h1><p>wants to verify your mobile number with Truecaller.</p>"
        + (f'<p class="error" role="alert">{html.escape(error)}</p>' if error else "")
        + f'<form method="post" action="{DIALOG_PATH}">'
        f'<input type="hidden" name="deeplink" value="{html.escape(link.raw)}">'
        + "".join(f.render() for f in fields)
        + '<button name="action" value="continue" class="primary">Continue</button>'
        '<button name="action" value="another">Use another number</button>'
        '<button name="action" value="reject" class="quiet">Reject</button>'
        "</form><p class=muted>Continue makes Truecaller's server call the gateway back with a token;"
        " the gateway then fetches this profile from the sandbox profile host.</p></div>"
    )
    return html_page(f"Truecaller — {link.partner_name}", body, status_code=status_code, headers=_HEADERS)


def _verify(phone: str, *, prefilled: bool, error: str | None, status_code: int = 200) -> Response:
    methods = "".join(
        f'<option value="{value}"{" selected" if value == 20 else ""}>{html.escape(label)}</option>'
        for value, label in VERIPHONE_METHODS
    )
    buttons = "".join(
        f'<button name="status" value="{value}"{" class=primary" if value == 8192 else ""}>'
        f"{html.escape(label)} <small>({value})</small></button>"
        for value, label in VERIPHONE_CHOICES
    )
    note = "prefilled by the site" if prefilled else "typed by you"
    body = (
        '<div class="sheet"><p class="brand">Veriph.One <span class="tag">sandbox</span></p>'
        "<h1>Verify your phone number</h1>"
        + (f'<p class="error" role="alert">{html.escape(error)}</p>' if error else "")
        + '<form method="post">'
        + Field("phone", f"Phone number ({note})", phone, "tel").render()
        + f'<label for="method">Method</label><select id="method" name="method">{methods}</select>'
        + f"<p>What happens:</p>{buttons}</form>"
        "<p class=muted>The choice sets the attempt's status bits; you are then sent to the gateway's"
        " result endpoint, which asks the sandbox API for the result.</p></div>"
    )
    return html_page("Veriph.One", body, status_code=status_code, headers=_HEADERS)
