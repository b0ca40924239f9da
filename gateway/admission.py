"""Admission: whether a request may start work, decided before anything costs (a provider call, a row).

The limiters live in `limits.py`; this service adds what needs I/O (the number of pending
sessions, read from the store at most once a second) and what a refusal looks like to the
caller: `429 rate_limited` or `503 too_many_pending`, both with Retry-After, and a count in
`gateway_limited_total{limit}`. Nothing is logged about who was refused.
"""

from __future__ import annotations

import time

from gateway.errors import TooManyRequests, Unavailable
from gateway.limits import Clock, Limits, retry_after
from gateway.metrics import Metrics
from gateway.storage.base import Store

# How stale the pending count may be; sessions admitted since it was read are added to it.
PENDING_REFRESH = 1.0
# Retry-After of a full gateway: pending sessions end within their ttl, most much sooner.
BUSY_RETRY_AFTER = 5


def rate_limited(limit: str, wait: float) -> TooManyRequests:
    seconds = retry_after(wait)
    return TooManyRequests(
        "rate_limited",
        f"too many requests ({limit}); retry in {seconds} s",
        {"retry-after": str(seconds)},
    )


class Admission:
    def __init__(self, limits: Limits, store: Store, metrics: Metrics, *, clock: Clock = time.monotonic) -> None:
        self.limits = limits
        self.store = store
        self.metrics = metrics
        self._clock = clock
        self._pending = 0  # as last read from the store
        self._admitted = 0  # sessions let through since then
        self._read_at = float("-inf")
        self._reading = False

    @property
    def enabled(self) -> bool:
        return self.limits.enabled

    async def admit_session(self, ip: str | None, phone: str | None, *, per_address: bool = True) -> None:
        """Raise unless a new session may start for this client and number (before the provider is called).

        `per_address=False` for the site's own backend (it holds an API key): it starts the
        sessions of all its users from one address, so only the per-number limit and the
        pending cap apply to it.
        """
        if not self.limits.enabled:
            return
        limits = self.limits
        key = limits.ip_key(ip) if per_address else None
        wait = 0.0 if key is None else limits.sessions_per_ip.take(key)
        if wait:
            self.metrics.limited("sessions_per_ip")
            raise rate_limited("sessions per address", wait)
        if phone is not None:
            wait = limits.sessions_per_phone.take(limits.phone_key(phone))
            if wait:
                self.metrics.limited("sessions_per_phone")
                raise rate_limited("sessions per phone number", wait)
        if await self._pending_now() >= limits.cfg.max_pending_sessions:
            self.metrics.limited("max_pending_sessions")
            raise Unavailable(
                "too_many_pending",
                "the gateway has too many verifications in progress; retry shortly",
                {"retry-after": str(BUSY_RETRY_AFTER)},
            )
        self._admitted += 1

    def admit_callback(self, ip: str | None) -> None:
        """Raise unless this source may send another provider callback now."""
        if not self.limits.enabled:
            return
        key = self.limits.ip_key(ip)
        if key is None:
            return
        wait = self.limits.callbacks_per_ip.take(key)
        if wait:
            self.metrics.limited("callbacks_per_ip")
            raise rate_limited("callbacks per address", wait)

    async def _pending_now(self) -> int:
        """The pending count: read from the (possibly shared) store at most once a second."""
        now = self._clock()
        if now - self._read_at >= PENDING_REFRESH and not self._reading:
            self._reading = True  # one read at a time; meanwhile others use the last count
            try:
                admitted = self._admitted
                count = await self.store.count_pending()
                # Sessions admitted while the read ran may or may not be in it: count them.
                self._pending, self._admitted, self._read_at = count, self._admitted - admitted, now
            finally:
                self._reading = False
        return self._pending + self._admitted
