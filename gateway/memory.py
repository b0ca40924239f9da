"""Give memory back to the OS after a wave of streams has closed.

Ten thousand streams grow the heap by ~130 MiB. When they close, Python frees the objects
but glibc keeps the freed pages in its arenas, so the process stays large (the benchmark's
leak check saw +90 MiB). After a drop of many open streams, a full collection followed by
glibc's `malloc_trim(0)` hands those pages back. Rare by design: at most every `interval`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("gateway.memory")


def _malloc_trim() -> Callable[[], None] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim  # glibc only; musl and others have none
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> None:
        trim(0)

    return release


class StreamCounter(Protocol):
    def count(self) -> int: ...

    def take_peak(self) -> int:
        """The most streams open at once since the last call; counting restarts from now."""
        ...


class MemoryReleaser:
    """Watches the number of open streams; after a large drop, releases freed memory.

    The peak is the counter's own (kept on every subscribe), not sampled: a wave of streams
    that opens and closes between two checks is seen too.
    """

    def __init__(self, streams: StreamCounter, *, drop: int = 500, interval: float = 2.0) -> None:
        self._streams = streams
        self._drop = drop
        self._interval = interval
        self._peak = 0
        self._trim = _malloc_trim()
        self.releases = 0

    def check(self) -> bool:
        """Release if the open streams fell by `drop` since their peak; True if it did."""
        now = self._streams.count()
        self._peak = max(self._peak, self._streams.take_peak(), now)
        if self._peak - now < self._drop:
            return False
        self._peak = now
        gc.collect()
        if self._trim is not None:
            self._trim()
        self.releases += 1
        log.info("released memory after streams closed", extra={"open_streams": now})
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.check()
            except Exception:
                log.exception("memory release failed")
