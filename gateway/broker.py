"""In-process publish/subscribe keyed by session id.

Each subscriber owns a small bounded buffer and at most one waiting future; publishing is a
few appends and `set_result` calls and never awaits, so a slow reader cannot hold up the
publisher. A subscriber whose buffer overflows is closed instead (it reconnects and is
served from the database). Heartbeats and stream deadlines are `call_later` timers, not
tasks, so an idle stream costs one coroutine frame chain and a few small objects.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

TIMEOUT = "timeout"
CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    kind: str  # "progress" | "outcome"
    frame: bytes  # the encoded SSE frame, shared by all subscribers
    data: dict[str, object]


class Subscriber:
    """One listener: a bounded buffer, and either a waiting future or an `on_wake` callback."""

    __slots__ = ("_broker", "_buffer", "_limit", "_timer", "_waiter", "close_reason", "on_wake", "session_id")

    def __init__(self, broker: Broker, session_id: str, limit: int) -> None:
        self._broker = broker
        self.session_id = session_id
        self._buffer: list[Event] | None = None  # allocated on the first event: most wait idle
        self._limit = limit
        self._waiter: asyncio.Future[str] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.close_reason: str | None = None
        # Called (synchronously, from publish or close) instead of waking a `wait`er.
        self.on_wake: Callable[[], None] | None = None

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    def push(self, event: Event) -> None:
        if self.close_reason is not None:
            return
        if self._buffer is None:
            self._buffer = []
        if len(self._buffer) >= self._limit:
            self.close("overflow")
            return
        self._buffer.append(event)
        self._wake("event")

    def close(self, reason: str) -> None:
        """Stop this subscription; a pending `wait` returns at once."""
        if self.close_reason is None:
            self.close_reason = reason
            self._broker._discard(self)
        self._wake(CLOSED)

    def drain(self) -> list[Event]:
        events, self._buffer = self._buffer, None
        return events or []

    async def wait(self, timeout: float) -> str:
        """Wait until an event is buffered, the subscriber is closed, or `timeout` seconds pass."""
        if self.close_reason is not None:
            return CLOSED  # what it missed is in the database; it reconnects
        if self._buffer:
            return "event"
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._timer = loop.call_later(max(timeout, 0.0), self._wake, TIMEOUT)
        try:
            result: str = await waiter
            return result
        finally:
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _wake(self, why: str) -> None:
        if self.on_wake is not None:
            self.on_wake()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(why)


class Broker:
    def __init__(self, buffer: int = 16) -> None:
        self._subs: dict[str, list[Subscriber]] = {}
        self._count = 0
        self._peak = 0  # the most subscribers at once since the last take_peak()
        self._buffer = buffer
        self.closed = False
        self._closing: list[asyncio.TimerHandle] = []  # closes spread over a shutdown window

    def subscribe(self, session_id: str) -> Subscriber:
        sub = Subscriber(self, session_id, self._buffer)
        if self.closed:
            sub.close("shutdown")
            return sub
        self._subs.setdefault(session_id, []).append(sub)
        self._count += 1
        if self._count > self._peak:
            self._peak = self._count
        return sub

    def publish(self, session_id: str, event: Event) -> int:
        """Hand `event` to every current subscriber of the session; returns how many got it."""
        subs = self._subs.get(session_id)
        if not subs:
            return 0
        for sub in list(subs):
            sub.push(event)
        return len(subs)

    def close_all(
        self, reason: str = "shutdown", spread: float = 0.0, rng: Callable[[], float] = random.random
    ) -> None:
        """Close every subscription (graceful shutdown: streams end, browsers reconnect).

        With `spread`, each one is closed at a random moment within that many seconds, so
        thousands of browsers do not all come back in the same instant; new subscriptions are
        refused at once either way. A later call without `spread` closes the rest now.
        """
        self.closed = True
        for handle in self._closing:
            handle.cancel()
        self._closing = []
        loop = asyncio.get_running_loop() if spread > 0 else None
        for subs in list(self._subs.values()):
            for sub in list(subs):
                if loop is None:
                    sub.close(reason)
                else:
                    self._closing.append(loop.call_later(rng() * spread, sub.close, reason))

    def close_current(self, reason: str) -> None:
        """Close every subscription open now; new ones are still taken (e.g. after a lost feed)."""
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close(reason)

    def has(self, session_id: str) -> bool:
        return session_id in self._subs

    def subscribers(self, session_id: str) -> list[Subscriber]:
        return list(self._subs.get(session_id, ()))

    def count(self) -> int:
        return self._count

    def take_peak(self) -> int:
        """The most subscribers open at once since the last call; counting restarts from now."""
        peak, self._peak = self._peak, self._count
        return peak

    def _discard(self, sub: Subscriber) -> None:
        subs = self._subs.get(sub.session_id)
        if subs is None:
            return
        try:
            subs.remove(sub)
        except ValueError:
            return
        self._count -= 1
        if not subs:
            del self._subs[sub.session_id]
