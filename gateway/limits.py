"""Abuse limits as plain data structures: keyed token buckets and concurrent-slot counters.

Pure: no I/O, no event loop; the clock is injected, so tests step time by hand. Both
structures have bounded memory whatever keys a hostile client invents: a `RateLimiter`
forgets its least recently used keys beyond `max_keys` (a forgotten key starts again with a
full burst, the price of the bound), and `Slots` keeps a key only while it holds a slot, so
its size is capped by its own total.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.clientip import IPNetwork, parse_networks
from gateway.config import LimitsConfig

Clock = Callable[[], float]
KEY_CACHE = 4096  # addresses whose limiter key is remembered


def retry_after(seconds: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(seconds))


class RateLimiter:
    """One token bucket per key: `burst` tokens, refilled at `rate` tokens per second."""

    __slots__ = ("_buckets", "_clock", "burst", "max_keys", "rate")

    def __init__(self, burst: int, rate: float, *, max_keys: int = 50_000, clock: Clock = time.monotonic) -> None:
        if burst < 1 or rate <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be >= 1 and rate > 0")
        self.burst = float(burst)
        self.rate = rate
        self.max_keys = max_keys
        self._clock = clock
        # key -> [tokens, when they were counted]; dict order is least recently used first.
        self._buckets: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Spend one token of `key`: 0.0 if there was one, else the seconds until there is."""
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = [self.burst, now]
        else:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        self._buckets[key] = bucket  # re-inserted: now the most recently used
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - bucket[0]) / self.rate
        if len(self._buckets) > self.max_keys:
            self._evict()
        return wait

    def _evict(self) -> None:
        """Forget the least recently used eighth: amortised O(1) per call, and a flood of new
        keys pushes out idle buckets (mostly full again, so nothing is lost) before busy ones."""
        drop = list(itertools.islice(self._buckets, max(1, self.max_keys // 8)))
        for key in drop:
            del self._buckets[key]


class Slots:
    """Concurrent holders: at most `per_key` for one key and `total` over all keys."""

    __slots__ = ("_held", "per_key", "total", "used")

    PER_KEY = "per_key"
    TOTAL = "total"

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key = per_key
        self.total = total
        self.used = 0
        self._held: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._held)

    def acquire(self, key: str | None) -> str | None:
        """Take a slot for `key` (None: counted in the total only): None if taken, else which cap refused it."""
        if self.used >= self.total:
            return self.TOTAL
        if key is None:
            self.used += 1
            return None
        held = self._held.get(key, 0)
        if held >= self.per_key:
            return self.PER_KEY
        self._held[key] = held + 1
        self.used += 1
        return None

    def release(self, key: str | None) -> None:
        if key is None:
            self.used = max(0, self.used - 1)
            return
        held = self._held.get(key, 0)
        if held <= 0:
            return
        if held == 1:
            del self._held[key]
        else:
            self._held[key] = held - 1
        self.used -= 1


def ip_key(ip: str | None, exempt: tuple[IPNetwork, ...] = ()) -> str | None:
    """The key an address is limited by: IPv4 as is, IPv6 by its /64 (one subscriber's share);
    None for an address in `exempt` (per-address limits do not apply to it)."""
    if not ip:
        return "-"
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
        ip = str(address)
    if any(address.version == net.version and address in net for net in exempt):
        return None
    if address.version == 4:
        return ip
    return str(ipaddress.IPv6Network((address, 64), strict=False).network_address) + "/64"


@dataclass(frozen=True, slots=True)
class PhoneHasher:
    """Phone numbers are limited by a keyed hash, so the limiter's memory holds no number."""

    key: bytes

    @classmethod
    def fresh(cls) -> PhoneHasher:
        return cls(os.urandom(16))

    def __call__(self, phone: str) -> str:
        return hashlib.blake2b(phone.encode(), key=self.key, digest_size=12).hexdigest()


class Limits:
    """Every limiter of one gateway, built from `[limits]`; `enabled = false` builds none of them."""

    def __init__(self, cfg: LimitsConfig, *, clock: Clock = time.monotonic) -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled
        keys = cfg.tracked_keys
        per_minute = 1 / 60
        self.sessions_per_ip = RateLimiter(
            cfg.sessions_per_ip_burst, cfg.sessions_per_ip_rate * per_minute, max_keys=keys, clock=clock
        )
        self.sessions_per_phone = RateLimiter(
            cfg.sessions_per_phone_burst, cfg.sessions_per_phone_rate * per_minute, max_keys=keys, clock=clock
        )
        self.callbacks_per_ip = RateLimiter(
            cfg.callbacks_per_ip_burst, cfg.callbacks_per_ip_rate * per_minute, max_keys=keys, clock=clock
        )
        self.streams = Slots(cfg.streams_per_ip, cfg.streams_total)
        self.long_polls = Slots(cfg.long_polls_per_ip, cfg.long_polls_total)
        self.phone_key = PhoneHasher.fresh()
        self.exempt = parse_networks(cfg.exempt)
        # Parsing an address costs microseconds on every stream open; the answers are cached,
        # and the cache is emptied when full (bounded under invented addresses).
        self._keys: dict[str | None, str | None] = {}

    def ip_key(self, ip: str | None) -> str | None:
        """The per-address key of a client (see `ip_key`); None when it is exempt."""
        try:
            return self._keys[ip]
        except KeyError:
            pass
        if len(self._keys) >= KEY_CACHE:
            self._keys.clear()
        key = self._keys[ip] = ip_key(ip, self.exempt)
        return key
