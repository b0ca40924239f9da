"""The cap on the database's size: new sessions are refused while it holds more than `database.max_size_mb`.

Outcomes, callbacks and the retention purge still write, so a full database drains itself:
retention deletes old sessions and the space is reused. The size is asked of the store at
most once a second, whatever the request rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway.errors import Unavailable
from gateway.metrics import Metrics
from gateway.storage.base import Store

log = logging.getLogger("gateway.disk")

RETRY_AFTER = 60  # seconds: about one retention pass


class DiskCap:
    def __init__(
        self,
        store: Store,
        max_bytes: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 1.0,
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes  # 0: no cap (the size is still measured for the gauge)
        self.metrics = metrics
        self.clock = clock
        self.interval = interval
        self.bytes = 0
        self.full = False
        self._measured_at = float("-inf")

    async def measure(self) -> int:
        """The database's size, asked of the store at most once per `interval`."""
        now = self.clock()
        if now - self._measured_at < self.interval:
            return self.bytes
        self._measured_at = now
        self.bytes = await self.store.database_bytes()
        self.metrics.database_bytes.set(self.bytes)
        full = 0 < self.max_bytes < self.bytes
        if full != self.full:
            self.full = full
            mib = self.bytes / 2**20
            if full:
                log.warning(
                    "database above database.max_size_mb: new sessions are refused until retention frees space",
                    extra={"database_mib": round(mib, 1), "max_size_mb": self.max_bytes // 2**20},
                )
            else:
                log.info("database below database.max_size_mb again", extra={"database_mib": round(mib, 1)})
        return self.bytes

    async def check(self) -> None:
        """Raise 503 storage_full while the database is above its cap."""
        if self.max_bytes <= 0:
            return
        await self.measure()
        if self.full:
            raise Unavailable(
                "storage_full",
                "the gateway's database is full; retry later",
                {"retry-after": str(RETRY_AFTER)},
            )
