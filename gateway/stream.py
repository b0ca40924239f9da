"""`GET /v1/sessions/{id}/events`: one session's status, progress and outcome as SSE.

The response is a lean ASGI callable rather than a `StreamingResponse`: one coroutine per
stream, one task watching for the client's disconnect, timers for heartbeat and deadline.
No per-stream database polling: after the initial read, every event comes from the broker.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import Receive, Scope, Send

from gateway import sse
from gateway.broker import CLOSED, TIMEOUT, Event, Subscriber

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


class EventStreamResponse:
    """Streams `first` at once, then live events from `subscriber` until the outcome."""

    def __init__(
        self,
        subscriber: Subscriber,
        first: bytes,
        *,
        last_sent: int,
        finished: bool,
        heartbeat: float,
        max_duration: float,
    ) -> None:
        self.subscriber = subscriber
        self.first = first
        self.last_sent = last_sent
        self.finished = finished
        self.heartbeat = heartbeat
        self.max_duration = max_duration

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.subscriber
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(lambda _: sub.close("disconnect"))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": self.first, "more_body": not self.finished})
            if self.finished:
                return
            deadline = time.monotonic() + self.max_duration
            while True:
                left = deadline - time.monotonic()
                why = await sub.wait(min(self.heartbeat, left))
                if why == CLOSED:
                    break
                if why == TIMEOUT:
                    if time.monotonic() >= deadline:
                        break
                    await send({"type": "http.response.body", "body": sse.HEARTBEAT, "more_body": True})
                    continue
                chunk, done = self._frames(sub.drain())
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": not done})
                if done:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            sub.close("done")
            watcher.cancel()

    def _frames(self, events: list[Event]) -> tuple[bytes, bool]:
        parts: list[bytes] = []
        for event in events:
            if event.id <= self.last_sent:
                continue  # already sent from the database replay
            self.last_sent = event.id
            parts.append(event.frame)
            if event.kind == "outcome":
                return b"".join(parts), True
        return b"".join(parts), False


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
