"""Retention: a finished session's personal data is removed `sessions.retention` seconds later.

What stays is what operations need: provider, status, reason, timestamps and the Veriph.One
status flags. What goes: the phone number, user_ref and provider data of the session row,
and the outcome's phone, profile and user_ref, both in the row and in the stored `outcome`
event a reconnecting stream would replay. `purged_at` records when.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from functools import partial

from gateway.storage import Database

log = logging.getLogger("gateway.retention")

SCRUBBED_OUTCOME_KEYS = ("phone", "user_ref", "profile")
# Sessions per transaction: a pass never holds the single writer for long.
BATCH = 200


def purge_interval(retention: float) -> float:
    """Seconds between passes: min(60, retention / 2), but at least 1 so retention = 0 does not spin."""
    return max(1.0, min(60.0, retention / 2))


def scrub_outcome(text: str | None) -> str | None:
    """The outcome JSON with its personal fields set to null (other fields untouched)."""
    if not text:
        return text
    body = json.loads(text)
    for key in SCRUBBED_OUTCOME_KEYS:
        if key in body:
            body[key] = None
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _purge_batch(conn: sqlite3.Connection, *, cutoff: float, now: float, limit: int) -> int:
    rows = conn.execute(
        "SELECT id, outcome FROM sessions WHERE completed_at IS NOT NULL AND completed_at <= ?"
        " AND purged_at IS NULL ORDER BY completed_at LIMIT ?",
        (cutoff, limit),
    ).fetchall()
    for row in rows:
        conn.execute(
            "UPDATE sessions SET phone = NULL, user_ref = NULL, provider_data = NULL, outcome = ?, purged_at = ?"
            " WHERE id = ?",
            (scrub_outcome(row["outcome"]), now, row["id"]),
        )
        events = conn.execute(
            "SELECT id, data FROM session_events WHERE session_id = ? AND kind = 'outcome'", (row["id"],)
        ).fetchall()
        for event in events:
            conn.execute("UPDATE session_events SET data = ? WHERE id = ?", (scrub_outcome(event["data"]), event["id"]))
    return len(rows)


class Retention:
    """Purges personal data of sessions completed more than `retention` seconds ago."""

    def __init__(
        self, db: Database, retention: float, clock: Callable[[], float] = time.time, batch: int = BATCH
    ) -> None:
        self.db = db
        self.retention = retention
        self.clock = clock
        self.batch = batch
        self.interval = purge_interval(retention)

    async def purge_once(self) -> int:
        """One pass, in batches of `batch` sessions per transaction; returns how many were purged."""
        total = 0
        while True:
            now = self.clock()
            done = await self.db.write(partial(_purge_batch, cutoff=now - self.retention, now=now, limit=self.batch))
            total += done
            if done < self.batch:
                break
        if total:
            log.info("purged personal data of finished sessions", extra={"sessions": total})
        return total

    async def run(self, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """Background task: a pass every `interval` seconds until cancelled."""
        while True:
            try:
                await self.purge_once()
            except Exception:
                log.exception("retention pass failed")
            await sleep(self.interval)
