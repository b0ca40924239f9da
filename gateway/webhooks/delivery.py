"""The delivery worker: sends the webhook outbox, at least once, off every request's path.

Rows come from the outbox (written with their outcome), so a crash loses nothing: what was
pending is sent after the next start. An attempt succeeds on any 2xx. Timeouts, connection
errors, 429 and 5xx are retried with exponential backoff and full jitter (at least the
receiver's `Retry-After`); any other answer fails the row at once. After `max_attempts` or
`max_age` a row is failed; `gateway webhooks retry` sends it again. At most `concurrency`
requests are in flight, and nothing here is awaited by a callback or a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import logging
import random
import time
from collections.abc import Callable

import httpx

from gateway.config import WebhooksConfig
from gateway.metrics import Metrics
from gateway.records import OutboxItem, OutboxResult
from gateway.sessions import public_ref
from gateway.storage.base import Store
from gateway.webhooks.signing import headers, parse_secret

log = logging.getLogger("gateway.webhooks")

MAX_DELAY = 3600.0
IDLE_POLL = 5.0  # rows retried by the operator's CLI in another process are seen this soon
# A new outcome wakes the worker this much later: the callback's answer and the stream's
# outcome frame go out first, and a burst of outcomes is picked up by one pass.
WAKE_DELAY = 0.005
# Attempt results are written together, at most this often: one commit for many deliveries.
RECORD_DELAY = 0.02


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    # ASCII only: str.isdigit() is also true for "²", which float() refuses; an exception
    # here would leave the attempt unrecorded and the row due, sent again at once, forever.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def backoff(base: float, attempts: int, rng: Callable[[], float] = random.random) -> float:
    """Full jitter over an exponential ceiling: spread retries so receivers are not hit in waves."""
    ceiling = min(MAX_DELAY, base * 2.0 ** max(0, attempts - 1))
    return float(ceiling * (0.5 + rng() / 2))


class WebhookSender:
    def __init__(
        self,
        store: Store,
        cfg: WebhooksConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.keys = [parse_secret(s) for s in cfg.secrets]
        self.http = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=cfg.timeout)
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._wake_pending = False
        self._results: list[OutboxResult] = []
        self._written: asyncio.Future[None] | None = None  # resolves when `_results` are committed

    def wake(self) -> None:
        """An outcome with a webhook was committed: look at the outbox very soon."""
        if not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_later(WAKE_DELAY, self._woken)

    def _woken(self) -> None:
        self._wake_pending = False
        self._wakeup.set()

    async def run(self) -> None:
        """Background task: send what is due, sleep until the next row is due or a new one comes."""
        while True:
            self._wakeup.clear()
            try:
                await self.pass_once()
                next_due = await self.store.outbox_next_due()
                oldest = await self.store.outbox_oldest_pending()
                self.metrics.webhook_oldest_pending.set(0.0 if oldest is None else max(0.0, self.clock() - oldest))
            except Exception:
                log.exception("webhook pass failed")
                next_due = None
            delay = IDLE_POLL if next_due is None else min(IDLE_POLL, max(0.0, next_due - self.clock()))
            if self._inflight and delay <= 0:
                delay = IDLE_POLL  # everything due is in flight: its end wakes us
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), delay)

    async def pass_once(self) -> int:
        """Start an attempt for every due row not already in flight (bounded by `concurrency`)."""
        started = 0
        # Taken before the read: a row in flight then may finish while this pass waits for a
        # slot, and must not be sent again from the now stale list.
        busy = set(self._inflight)
        due = await self.store.outbox_due(self.clock(), self.cfg.concurrency * 8)
        for item in due:
            if item.id in busy or item.id in self._inflight:
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._send(item), name="webhook-delivery")
            self._inflight[item.id] = task
            task.add_done_callback(functools.partial(self._done, item.id))
            started += 1
        return started

    def _done(self, key: str, task: asyncio.Task[None]) -> None:
        self._inflight.pop(key, None)
        self.wake()

    async def _write(self, result: OutboxResult) -> None:
        self._results.append(result)
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(RECORD_DELAY, self._flush)
        await asyncio.shield(self._written)

    def _flush(self) -> None:
        results, self._results = self._results, []
        written, self._written = self._written, None
        assert written is not None
        task = asyncio.ensure_future(self.store.outbox_record(results))

        def settle(done: asyncio.Future[None]) -> None:
            if done.cancelled():
                written.cancel()
            elif done.exception() is not None:
                log.error("recording webhook attempts failed; they will be sent again", exc_info=done.exception())
                written.set_result(None)
            else:
                written.set_result(None)

        task.add_done_callback(settle)

    async def drain(self, timeout: float) -> None:
        """On shutdown: let attempts in flight end (a cut one stays pending and is sent after restart)."""
        if self._inflight:
            _, late = await asyncio.wait(set(self._inflight.values()), timeout=timeout)
            for task in late:
                task.cancel()
        await self.http.aclose()

    async def _send(self, item: OutboxItem) -> None:
        attempts = item.attempts + 1
        body = item.payload.encode()
        now = self.clock()
        status: int | None = None
        wait: float | None = None
        try:
            async with asyncio.timeout(self.cfg.timeout):  # the whole attempt, also a slow drip
                response = await self.http.post(
                    self.cfg.url, content=body, headers=headers(self.keys, item.id, int(now), body)
                )
            status = response.status_code
            if 200 <= status < 300:
                error = None
            elif status == 429 or status >= 500:
                error, wait = "status", retry_after(response.headers.get("retry-after"), self.clock())
            else:
                error = "refused"  # the receiver said no: sending it again would not change that
        except TimeoutError:
            error = "timeout"
        except httpx.HTTPError:
            error = "connect"
        finally:
            # The request is over: its slot goes to the next row while the result is written.
            self._slots.release()
        self.metrics.webhook_attempts.inc()
        await self._record(item, attempts, status, error, wait)

    async def _record(
        self, item: OutboxItem, attempts: int, status: int | None, error: str | None, wait: float | None
    ) -> None:
        now = self.clock()
        ref = public_ref(item.session_id)
        if error is None:
            result, next_at, finished = "delivered", now, now
        elif error == "refused" or attempts >= self.cfg.max_attempts or now - item.enqueued_at >= self.cfg.max_age:
            result, next_at, finished = "failed", now, now
        else:
            delay = max(backoff(self.cfg.backoff, attempts), min(wait or 0.0, self.cfg.max_age))
            result, next_at, finished = "pending", now + delay, None
        # The row stays "in flight" until its result is committed, so no pass sends it again.
        await self._write(OutboxResult(item.id, result, attempts, next_at, finished, status, error))
        self.metrics.webhook_deliveries.labels("retried" if result == "pending" else result).inc()
        line = {"session": ref, "webhook": item.id, "attempts": attempts, "http_status": status, "detail": error}
        if result == "failed":
            log.warning("webhook delivery failed for good", extra=line)
        elif result == "pending":
            log.info("webhook delivery will be retried", extra={**line, "retry_in": round(next_at - now, 3)})
        else:
            log.info("webhook delivered", extra=line)
