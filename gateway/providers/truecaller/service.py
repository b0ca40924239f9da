"""Truecaller mobile-web verification: the deep link, the server callback, the profile fetch.

A token callback is checked (endpoint host rules) and the profile fetched at once. If the
profile comes within `ONE_COMMIT_WAIT`, the token, the progress event and the outcome are
committed together and then the callback is answered; otherwise the token is stored durably
alone (a conditional insert that only the first callback of a session wins), the callback
answered, and the outcome follows when the fetch ends. A stored row lets a restarted gateway
resume the fetch; it is deleted once the outcome is written. The access token is a secret:
it is never logged.

On a database several processes share, no process can wait for another's callback of the
same session: there the token is stored first (found by requestId in the same call) and only
the callback whose claim was stored fetches the profile (`_on_shared_token`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from urllib.parse import quote

from gateway.config import TruecallerConfig
from gateway.errors import BadRequest, NotFound, Unavailable
from gateway.outcome import FAILED, REJECTED, Outcome
from gateway.providers.base import Client, Deps, Prepared
from gateway.providers.truecaller.client import FetchDenied, FetchOk, FetchResult, fetch_profile
from gateway.providers.truecaller.decode import (
    FLOW_INVOKED,
    REJECTIONS,
    StatusCallback,
    TokenCallback,
    decode_profile,
    loggable_status,
)
from gateway.providers.truecaller.endpoint_guard import CheckedEndpoint, Resolver, check_endpoint
from gateway.providers.truecaller.profile_client import ProfileClient
from gateway.records import TOKEN_LIFETIME, ClaimResult, Session, TokenClaim
from gateway.sessions import public_ref

log = logging.getLogger("gateway.truecaller")

DEEPLINK_BASE = "truecallersdk://truesdk/web_verify"
# The session outlives the token by this much, so the fetch (bounded by the token) always
# writes its own outcome before the core expiry task could call it a timeout.
EXPIRY_GRACE = 5.0
# Truecaller wants an answer within 3 s; DNS is the only slow step before it.
RESOLVE_TIMEOUT = 1.5
# A token callback waits this long for the profile before it commits the token alone: a
# profile that comes sooner commits with the token and the outcome in one fsync (a shorter
# path from callback to browser), and the answer to Truecaller is at most this much later.
ONE_COMMIT_WAIT = 0.25


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

    def __init__(self, deps: Deps, profile_client: ProfileClient) -> None:
        self.settings = deps.settings
        self.cfg = deps.settings.providers.truecaller
        self.sessions = deps.sessions
        self.store = deps.store
        self.metrics = deps.metrics
        self.background = deps.background
        self.profile_client = profile_client
        # Seams for tests and the sandbox: the DNS resolver of the endpoint check and the
        # retry pace of the profile fetch (5xx backoff doubles from this many seconds).
        self.resolve: Resolver | None = None
        self.fetch_attempts = 4
        self.fetch_backoff = 0.2
        # Sessions whose fetch runs in this process; the durable insert already allows only
        # one per session, this also covers a resume racing anything else in-process.
        self._fetching: set[str] = set()
        # Sessions whose token callback waits for its speculative fetch, nothing stored yet.
        self._deciding: dict[str, asyncio.Future[ClaimResult]] = {}

    async def prepare(self, *, session_id: str, phone: str | None, user_ref: str | None, client: Client) -> Prepared:
        nonce = new_nonce()
        ttl = min(float(self.settings.sessions.ttl), self.cfg.callback_timeout)
        return Prepared(
            ttl=ttl,
            provider_ref=nonce,
            public={"request_nonce": nonce, "deeplink": build_deeplink(self.cfg, nonce)},
        )

    async def startup(self) -> None:
        """Resume profile fetches a stop or crash interrupted; drop rows of finished sessions."""
        await self._take_over()

    async def run(self) -> None:
        """On a shared database: take over, every third of a lease, the fetches of dead instances."""
        if not self.store.shared:
            return  # one process: startup took over everything there was
        while True:
            await asyncio.sleep(self.cfg.fetch_lease / 3)
            try:
                await self._take_over()
            except Exception:
                log.warning("taking over interrupted truecaller fetches failed; will retry", exc_info=True)

    async def _take_over(self) -> None:
        claims = await self.store.pending_claims(self.sessions.clock(), self.cfg.fetch_lease)
        if claims:
            log.info("resuming interrupted truecaller profile fetches", extra={"count": len(claims)})
        for c in claims:
            self._start_fetch(c.session_id, c.phone, c.endpoint, c.access_token, c.token_expires_at)

    async def on_callback(self, parsed: StatusCallback | TokenCallback) -> str:
        """Truecaller's server reports a token or a status; "accepted" or "ignored", else an ApiError."""
        if isinstance(parsed, TokenCallback) and self.store.shared:
            return await self._on_shared_token(parsed)
        session = await self.sessions.get_by_ref(self.name, parsed.request_id)
        if session is None or session.terminal:
            raise _no_session()
        if isinstance(parsed, StatusCallback):
            return await self._on_status(session, parsed.status)
        return await self._on_token(session, parsed)

    async def _on_status(self, session: Session, status: str) -> str:
        ref = public_ref(session.id)
        shown = loggable_status(status)
        await self._settled(session.id)
        if await self.store.has_claim(session.id):
            # The user already consented and the fetch owns the outcome; a late status must not race it.
            log.info("truecaller status callback after the token: ignored", extra={"session": ref, "status": shown})
            return "ignored"
        if status == FLOW_INVOKED:
            await self.sessions.progress(session.id, FLOW_INVOKED)
        elif status in REJECTIONS:
            # Conditional in the same transaction: a token stored meanwhile (by any instance) wins.
            await self.sessions.finish(session.id, Outcome(REJECTED, status), unless_claimed=True)
        else:
            log.info("truecaller status callback not handled", extra={"session": ref, "status": shown})
            return "ignored"
        log.info("truecaller status callback", extra={"session": ref, "status": shown})
        return "accepted"

    async def _on_token(self, session: Session, callback: TokenCallback) -> str:
        ref = public_ref(session.id)
        try:
            endpoint = await self._check(callback.endpoint)
        except BadRequest:
            self._endpoint_refused(ref)
            raise
        sid = session.id
        token_hash = _token_hash(callback)
        while True:
            await self._settled(sid)
            owner = await self.store.token_owner(token_hash)
            deciding = self._deciding.get(sid)
            if deciding is None or deciding.done():  # no other callback of the session began deciding meanwhile
                break
        claim = self._claim(sid, endpoint, callback, token_hash)
        # The profile is fetched at once, before the token is durable (a delivery sooner by
        # the fetch's round trip), unless a fetch already runs for the session or the token
        # is known to belong to another one, so a replay causes no request.
        speculative = sid not in self._fetching and owner in (None, sid)
        decided: asyncio.Future[ClaimResult] = asyncio.get_running_loop().create_future()
        if speculative:  # before anything else runs: a callback read in the same pass waits for this one
            self._fetching.add(sid)
            self._deciding[sid] = decided
        # A task of its own: the commit finishes even if Truecaller hangs up on this request.
        task = self.background.spawn(
            self._accept(session, endpoint, claim, speculative, decided), name=f"truecaller-token-{ref}"
        )
        task.add_done_callback(lambda _: self._decision_over(sid, decided, speculative))
        return self._answer(await asyncio.shield(decided), ref)

    async def _on_shared_token(self, callback: TokenCallback) -> str:
        """A token callback on a shared database.

        Another instance may hold a callback of the same session that this process cannot
        wait for: the token is stored first, and only the callback whose claim is stored
        fetches (one fetch per token across instances). The session is found by requestId in
        the same call that stores the claim: one round trip to the database, not two.
        """
        try:
            endpoint = await self._check(callback.endpoint)
        except BadRequest:
            # As everywhere: a callback for no pending session is a 404, whatever else is wrong with it.
            session = await self.sessions.get_by_ref(self.name, callback.request_id)
            if session is None or session.terminal:
                raise _no_session() from None
            self._endpoint_refused(public_ref(session.id))
            raise
        claim = self._claim("", endpoint, callback, _token_hash(callback))
        decided: asyncio.Future[ClaimResult] = asyncio.get_running_loop().create_future()
        found: list[str] = []  # the session's id, once the claim's call found it
        # A task of its own: the commit finishes even if Truecaller hangs up on this request.
        task = self.background.spawn(
            self._accept_shared(callback.request_id, endpoint, claim, decided, found), name="truecaller-token"
        )
        task.add_done_callback(lambda _: self._decision_over("", decided, False))
        stored = await asyncio.shield(decided)
        return self._answer(stored, public_ref(found[0]) if found else "-")

    async def _accept_shared(
        self,
        request_id: str,
        endpoint: CheckedEndpoint,
        claim: TokenClaim,
        decided: asyncio.Future[ClaimResult],
        found: list[str],
    ) -> None:
        """Store the token (not yet durable), and if it was stored, fetch and write the outcome."""
        fetch: asyncio.Future[Outcome] | None = None
        try:
            got = await self.sessions.progress_by_ref(
                self.name,
                request_id,
                "profile_fetching",
                claim=claim,
                expires_at=claim.token_expires_at + EXPIRY_GRACE,
                durable=False,
            )
            stored = _claimed(got.progressed.claim)
            if got.session_id is None or stored != "stored":
                if got.session_id is not None:
                    found.append(got.session_id)
                decided.set_result(stored)
                return
            sid = got.session_id
            found.append(sid)
            token = claim.access_token
            fetch = asyncio.ensure_future(self._outcome(sid, got.phone, endpoint, token, claim.token_expires_at))
            await self._fetch_after_claim(sid, fetch, decided)
        except BaseException as exc:
            _abandoned(fetch, decided, exc)
            raise

    def _claim(self, sid: str, endpoint: CheckedEndpoint, callback: TokenCallback, token_hash: str) -> TokenClaim:
        received = self.sessions.clock()
        return TokenClaim(
            sid,
            endpoint.url,
            callback.access_token,
            token_hash,
            received,
            received + TOKEN_LIFETIME,
            lease_until=received + self.cfg.fetch_lease,
        )

    def _endpoint_refused(self, ref: str) -> None:
        self.metrics.provider_errors.labels(self.name, "invalid_endpoint").inc()
        log.warning("truecaller token callback refused: endpoint fails the host rules", extra={"session": ref})

    def _answer(self, stored: ClaimResult, ref: str) -> str:
        """Truecaller's answer to a token callback, once its claim is decided."""
        if stored == "reused":
            self.metrics.provider_errors.labels(self.name, "token_reused").inc()
            log.warning(
                "truecaller token callback refused: token already used for another session", extra={"session": ref}
            )
            raise BadRequest("token_already_used", "this access token was already used to verify another session")
        if stored == "gone":
            raise _no_session()
        if stored == "repeat":
            log.info("truecaller token callback repeated: ignored", extra={"session": ref})
            return "accepted"
        log.info("truecaller token callback accepted", extra={"session": ref})
        return "accepted"

    async def _accept(
        self,
        session: Session,
        endpoint: CheckedEndpoint,
        claim: TokenClaim,
        speculative: bool,
        decided: asyncio.Future[ClaimResult],
    ) -> None:
        """Store the token, answer the callback (`decided`), fetch the profile, write the outcome.

        A speculative fetch starts before anything is stored. If it brings the profile within
        `ONE_COMMIT_WAIT`, the token, the progress event and the outcome share one commit and
        the callback is answered after it; otherwise the token commits alone while the fetch
        goes on, and the outcome follows in a second commit. Either way nothing is announced
        before it is durable, and an outcome is written only if this callback's token was the
        one stored (the claim was "stored").
        """
        sid = session.id
        token, token_expires_at = claim.access_token, claim.token_expires_at
        fetch: asyncio.Future[Outcome] | None = None
        try:
            if speculative:
                fetch = asyncio.ensure_future(self._outcome(sid, session.phone, endpoint, token, token_expires_at))
                await asyncio.wait((fetch,), timeout=ONE_COMMIT_WAIT)
            if fetch is not None and fetch.done():
                done = await self.sessions.progress_and_finish(
                    sid, "profile_fetching", fetch.result(), claim=claim, release_claim=True
                )
                decided.set_result(_claimed(done.claim))
                return
            # Store the token, outlive the fetch and announce it in one durable commit.
            done = await self.sessions.progress(
                sid, "profile_fetching", claim=claim, expires_at=token_expires_at + EXPIRY_GRACE
            )
            stored = _claimed(done.claim)
            decided.set_result(stored)
            if fetch is None:
                if stored == "stored":  # e.g. a fetch for a token that lost this race is still running
                    self._start_fetch(sid, session.phone, endpoint, token, token_expires_at, force=True)
                return
            if stored != "stored":
                fetch.cancel()  # another token owns the session, or it is over: no use for this profile
                return
            await self.sessions.finish(sid, await fetch, release_claim=True)
        except BaseException as exc:
            _abandoned(fetch, decided, exc)
            raise

    async def _fetch_after_claim(
        self, sid: str, fetch: asyncio.Future[Outcome], decided: asyncio.Future[ClaimResult]
    ) -> None:
        """On a shared database: the token is ours (committed, not yet flushed), the fetch runs.

        A profile within `ONE_COMMIT_WAIT` is answered after its outcome's durable commit,
        which flushes the token's commit with it: one wait for the disk, as on SQLite's one
        commit path. A slower one: the token is flushed, the callback answered, and the outcome
        follows. Either way Truecaller hears "accepted" only once the token is durable.
        """
        self._fetching.add(sid)
        try:
            await asyncio.wait((fetch,), timeout=ONE_COMMIT_WAIT)
            if not fetch.done():
                await self.store.flush()
                decided.set_result("stored")
            await self.sessions.finish(sid, await fetch, release_claim=True)
            if not decided.done():
                decided.set_result("stored")
        finally:
            self._fetching.discard(sid)

    def _decision_over(self, session_id: str, decided: asyncio.Future[ClaimResult], speculative: bool) -> None:
        """When a token callback's task ends, however it ends (also cancelled before it ran)."""
        if not decided.done():  # cancelled (shutdown) before it stored anything: Truecaller may retry
            decided.set_exception(Unavailable("shutting_down", "the gateway is stopping; retry"))
        if speculative:
            self._fetching.discard(session_id)
            if self._deciding.get(session_id) is decided:
                del self._deciding[session_id]

    async def _settled(self, session_id: str) -> None:
        """Wait until a token callback of this session that is deciding has stored or failed.

        While its speculative fetch runs, nothing of that callback is stored yet; another
        callback of the session must not overtake it, or a status callback finish a session
        whose user already consented. If that callback finished the session, NotFound.
        """
        deciding = self._deciding.get(session_id)
        if deciding is None:
            return
        await asyncio.wait((deciding,))
        current = await self.sessions.get(session_id)
        if current is None or current.terminal:
            raise _no_session()

    async def _check(self, url: str) -> CheckedEndpoint:
        return await check_endpoint(
            url,
            allowed_hosts=self.cfg.profile_hosts,
            require_https=self.cfg.require_https,
            require_public_ip=self.cfg.require_public_ip,
            resolve=self.resolve,
            resolve_timeout=RESOLVE_TIMEOUT,
        )

    def _start_fetch(
        self,
        session_id: str,
        phone: str | None,
        endpoint: CheckedEndpoint | str,
        token: str,
        token_expires_at: float,
        *,
        force: bool = False,
    ) -> None:
        if session_id in self._fetching and not force:
            return
        self._fetching.add(session_id)
        self.background.spawn(
            self._fetch(session_id, phone, endpoint, token, token_expires_at),
            name=f"truecaller-fetch-{public_ref(session_id)}",
        )

    async def _fetch(
        self, session_id: str, phone: str | None, endpoint: CheckedEndpoint | str, token: str, token_expires_at: float
    ) -> None:
        """Fetch, decode, finish, forget, for a stored token. Cancelled (shutdown) → the row stays."""
        try:
            outcome = await self._outcome(session_id, phone, endpoint, token, token_expires_at)
            await self.sessions.finish(session_id, outcome, release_claim=True)
        finally:
            self._fetching.discard(session_id)

    async def _outcome(
        self, session_id: str, phone: str | None, endpoint: CheckedEndpoint | str, token: str, token_expires_at: float
    ) -> Outcome:
        """The outcome the profile fetch decides; a bug in it is a provider_error, never a hang."""
        try:
            return await self._fetch_outcome(session_id, phone, endpoint, token, token_expires_at)
        except Exception:
            log.exception("truecaller profile fetch crashed", extra={"session": public_ref(session_id)})
            self.metrics.provider_errors.labels(self.name, "bug").inc()
            return Outcome(FAILED, "provider_error")

    async def _fetch_outcome(
        self, session_id: str, phone: str | None, endpoint: CheckedEndpoint | str, token: str, token_expires_at: float
    ) -> Outcome:
        ref = public_ref(session_id)
        if isinstance(endpoint, str):
            # Resumed after a restart: make sure the session outlives the fetch, and vet the
            # stored URL again against today's config and DNS before the token goes anywhere.
            await self.sessions.update_provider_data(session_id, {}, expires_at=token_expires_at + EXPIRY_GRACE)
            try:
                endpoint = await self._check(endpoint)
            except BadRequest:
                self.metrics.provider_errors.labels(self.name, "invalid_endpoint").inc()
                log.warning("resumed truecaller fetch: endpoint now fails the host rules", extra={"session": ref})
                return Outcome(FAILED, "provider_error")
        remaining = token_expires_at - self.sessions.clock()
        if remaining <= 0:
            # Decided: a token that expired while the gateway was down is our failure, not the
            # user's inaction, so the outcome is provider_error rather than a later timeout.
            self.metrics.provider_errors.labels(self.name, "token_expired").inc()
            log.warning("truecaller access token expired before the fetch", extra={"session": ref})
            return Outcome(FAILED, "provider_error")
        started = time.monotonic()
        result = await fetch_profile(
            self.profile_client,
            endpoint,
            token,
            timeout=self.cfg.http_timeout,
            deadline=started + remaining,
            attempts=self.fetch_attempts,
            backoff=self.fetch_backoff,
        )
        self.metrics.fetched(self.name, "profile", time.monotonic() - started)
        return self._decode(ref, result, phone)

    def _decode(self, ref: str, result: FetchResult, phone: str | None) -> Outcome:
        if isinstance(result, FetchOk):
            outcome = decode_profile(result.profile, expected_phone=phone)
            if outcome.reason == "provider_error":
                self.metrics.provider_errors.labels(self.name, "bad_profile").inc()
            log.info(
                "truecaller profile fetched",
                extra={"session": ref, "attempts": result.attempts, "status": outcome.status, "reason": outcome.reason},
            )
            return outcome
        if isinstance(result, FetchDenied):
            self.metrics.provider_errors.labels(self.name, "access_denied").inc()
            log.warning(
                "truecaller profile fetch denied",
                extra={"session": ref, "attempts": result.attempts, "http_status": result.status_code},
            )
            return Outcome(FAILED, "access_denied")
        self.metrics.provider_errors.labels(self.name, result.detail).inc()
        log.warning(
            "truecaller profile fetch failed",
            extra={
                "session": ref,
                "attempts": result.attempts,
                "detail": result.detail,
                "http_status": result.status_code,
            },
        )
        return Outcome(FAILED, "provider_error")


def _abandoned(fetch: asyncio.Future[Outcome] | None, decided: asyncio.Future[ClaimResult], exc: BaseException) -> None:
    """A token callback's task failed: no fetch goes on, and its answer (unless cancelled) is the error."""
    if fetch is not None:
        fetch.cancel()
    if not decided.done() and not isinstance(exc, asyncio.CancelledError):
        decided.set_exception(exc)


def _no_session() -> NotFound:
    return NotFound("session_not_found", "no pending Truecaller session has this requestId")


def _token_hash(callback: TokenCallback) -> str:
    return hashlib.sha256(callback.access_token.encode()).hexdigest()


def _claimed(result: ClaimResult | None) -> ClaimResult:
    assert result is not None  # a write with a claim always says what became of it
    return result
