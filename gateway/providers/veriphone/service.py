"""Veriph.One web and mobile verification: create the provider session, pull and decode its result once.

The result is pulled by one background task per session uuid (`Veriphone.settle`): every
request for that uuid — browser redirect or mobile POST, however many at once — awaits the
same task, so one process makes one provider call, and the session's single stored outcome
(`Sessions.finish`) decides every answer. The task is spawned on the gateway, so a client
that disconnects does not cut it short and shutdown waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.errors import ApiError, NotFound, ProviderFailure
from gateway.providers.base import Client, Deps, Prepared
from gateway.providers.veriphone.client import VeriphoneApi
from gateway.providers.veriphone.decode import decode_result
from gateway.sessions import public_ref

log = logging.getLogger("gateway.veriphone")

Settled = dict[str, Any] | ApiError


class Veriphone:
    name = "veriphone"

    def __init__(self, deps: Deps) -> None:
        self.settings = deps.settings
        self.cfg = deps.settings.providers.veriphone
        self.sessions = deps.sessions
        self.background = deps.background
        self.api = VeriphoneApi(
            deps.http,
            api_base=self.cfg.api_base,
            api_key=self.cfg.api_key,
            api_secret=self.cfg.api_secret,
            timeout=self.cfg.http_timeout,
        )
        self._inflight: dict[str, asyncio.Task[Settled]] = {}
        self._warned_unconfigured = False

    # --- start ---------------------------------------------------------------------------

    async def prepare(self, *, session_id: str, phone: str | None, user_ref: str | None, client: Client) -> Prepared:
        # The sandbox's fake accepts whatever it was given; only a real provider needs real keys.
        if not self.settings.sandbox and not (self.cfg.api_key and self.cfg.api_secret):
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
                user_agent=client.user_agent,
                ip_address=client.ip or "",
                locale=self.cfg.locale,
            )
        except ProviderFailure as exc:
            log.warning(
                "veriphone create-session failed",
                extra={"session": public_ref(session_id), "code": exc.code, "detail": exc.message},
            )
            raise
        return Prepared(
            ttl=float(self.settings.sessions.ttl),
            public={"session_uuid": created.uuid, "redirect_url": created.redirect_url},
            provider_ref=created.uuid,
            data={"redirect_url": created.redirect_url},
        )

    # --- result --------------------------------------------------------------------------

    async def settle(self, session_uuid: str) -> dict[str, Any]:
        """The stored outcome for a session uuid, pulling the result from Veriph.One first if still pending."""
        task = self._inflight.get(session_uuid)
        if task is None:
            task = self.background.spawn(self._settle(session_uuid), name="veriphone-result")
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
        sessions = self.sessions
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

    async def startup(self) -> None:
        return None

    async def run(self) -> None:
        return None
