"""gateway/limits.py and the pending count of gateway/admission.py: token buckets, slots, bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from gateway.admission import Admission
from gateway.config import LimitsConfig, settings_from_dict
from gateway.errors import ConfigError, TooManyRequests, Unavailable
from gateway.limits import Limits, PhoneHasher, RateLimiter, Slots, ip_key, retry_after
from gateway.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_gives_its_burst_then_one_token_per_interval() -> None:
    clock = Clock()
    bucket = RateLimiter(3, 0.5, clock=clock)  # 3 at once, then one every 2 s
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a") == pytest.approx(2.0)
    clock.now += 1.0
    assert bucket.take("a") == pytest.approx(1.0)  # a refused take spends nothing
    clock.now += 1.0
    assert bucket.take("a") == 0.0
    assert bucket.take("b") == 0.0  # keys are independent
    clock.now += 3600
    assert [bucket.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled to the burst, not beyond


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [retry_after(x) for x in (0.0, 0.01, 1.0, 1.2, 59.9)] == [1, 1, 1, 2, 60]


def test_a_flood_of_new_keys_keeps_memory_bounded() -> None:
    clock = Clock()
    bucket = RateLimiter(2, 1.0, max_keys=1000, clock=clock)
    tracemalloc.start()
    try:
        for i in range(5000):
            bucket.take(f"198.51.{i // 256}.{i % 256}")
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(200_000):
            bucket.take(f"spoofed-{i}")
            assert len(bucket) <= 1000
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert grown < 200_000, grown  # 200,000 keys later, still about the size of 1,000 buckets


def test_eviction_forgets_the_least_recently_used_keys_first() -> None:
    clock = Clock()
    bucket = RateLimiter(1, 0.001, max_keys=100, clock=clock)
    assert bucket.take("attacker") == 0.0
    for i in range(99):
        bucket.take(f"k{i}")
        assert bucket.take("attacker") > 0  # used again and again: never the one forgotten
    for i in range(99, 150):
        bucket.take(f"k{i}")
        assert bucket.take("attacker") > 0


def test_slots_cap_each_key_and_the_total_and_free_on_release() -> None:
    slots = Slots(per_key=2, total=3)
    assert slots.acquire("a") is None and slots.acquire("a") is None
    assert slots.acquire("a") == Slots.PER_KEY
    assert slots.acquire("b") is None
    assert slots.acquire("c") == Slots.TOTAL
    assert slots.acquire(None) == Slots.TOTAL  # an exempt client still counts in the total
    slots.release("a")
    assert slots.acquire(None) is None and slots.used == 3
    slots.release(None)
    slots.release("a")
    slots.release("b")
    assert slots.used == 0 and len(slots) == 0  # a key without slots is not remembered
    slots.release("never")  # harmless
    assert slots.used == 0


def test_ip_keys_group_ipv6_by_64_and_skip_exempt_addresses() -> None:
    limits = Limits(LimitsConfig())
    assert ip_key("203.0.113.7") == "203.0.113.7"
    assert ip_key("2001:db8:1:2:aaaa::1") == ip_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    assert limits.ip_key("127.0.0.1") is None and limits.ip_key("::1") is None
    assert limits.ip_key("203.0.113.7") == "203.0.113.7"
    assert ip_key(None) == "-"
    assert ip_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert limits.ip_key("::ffff:127.0.0.1") is None
    assert [limits.ip_key(f"198.51.100.{i % 250}") for i in range(10_000)][-1] == "198.51.100.249"
    assert len(limits._keys) <= 4096  # the cache of parsed addresses stays bounded


def test_phone_keys_are_keyed_hashes() -> None:
    hasher = PhoneHasher.fresh()
    key = hasher("+15551234567")
    assert "15551234567" not in key and key == hasher("+15551234567")
    assert key != PhoneHasher.fresh()("+15551234567")  # another process, another key


class FakeStore:
    def __init__(self) -> None:
        self.pending = 0
        self.reads = 0

    async def count_pending(self) -> int:
        self.reads += 1
        return self.pending


async def test_the_pending_cap_reads_the_store_at_most_once_a_second() -> None:
    clock = Clock()
    store = FakeStore()
    cfg = LimitsConfig(max_pending_sessions=5, sessions_per_ip_burst=1000, sessions_per_phone_burst=1000)
    admission = Admission(Limits(cfg, clock=clock), store, Metrics(), clock=clock)  # type: ignore[arg-type]
    store.pending = 3
    await admission.admit_session("203.0.113.1", None)
    await admission.admit_session("203.0.113.1", None)  # 3 stored + 2 admitted since the read
    with pytest.raises(Unavailable) as refused:
        await admission.admit_session("203.0.113.1", None)
    assert refused.value.code == "too_many_pending" and refused.value.headers["retry-after"] == "5"
    assert store.reads == 1
    store.pending = 0  # they ended
    clock.now += 1.0
    await admission.admit_session("203.0.113.1", None)
    assert store.reads == 2


async def test_session_limits_per_address_and_per_phone() -> None:
    clock = Clock()
    cfg = LimitsConfig(sessions_per_ip_burst=2, sessions_per_ip_rate=6, sessions_per_phone_burst=1)
    admission = Admission(Limits(cfg, clock=clock), FakeStore(), Metrics(), clock=clock)  # type: ignore[arg-type]
    await admission.admit_session("203.0.113.1", "+15551234567")
    with pytest.raises(TooManyRequests) as refused:
        await admission.admit_session("203.0.113.2", "+15551234567")  # another address, the same number
    assert refused.value.code == "rate_limited" and refused.value.headers["retry-after"] == "60"
    await admission.admit_session("203.0.113.1", None)
    with pytest.raises(TooManyRequests) as refused:
        await admission.admit_session("203.0.113.1", None)
    assert refused.value.headers["retry-after"] == "10"  # 6 a minute: one every 10 s
    for _ in range(5):
        await admission.admit_session("127.0.0.1", None)  # exempt from the per-address bucket


async def test_disabled_limits_admit_everything() -> None:
    admission = Admission(Limits(LimitsConfig(enabled=False)), FakeStore(), Metrics())  # type: ignore[arg-type]
    for _ in range(100):
        await admission.admit_session("203.0.113.1", "+15551234567")
        admission.admit_callback("203.0.113.1")


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"sessions_per_ip_burst": 0}, "limits.sessions_per_ip_burst: expected an integer 1-1000000, got 0"),
        ({"sessions_per_phone_rate": 0}, "limits.sessions_per_phone_rate: expected a number per minute > 0"),
        ({"streams_per_ip": 20, "streams_total": 10}, "limits.streams_per_ip: expected an integer from 1 to"),
        ({"body_timeout": 0}, "limits.body_timeout: expected seconds > 0 and <= 600, got 0.0"),
        ({"max_header_bytes": 100}, "limits.max_header_bytes: expected bytes 1024-1048576, got 100"),
        ({"exempt": ["localhost"]}, "limits.exempt: expected IP addresses or CIDR networks, got 'localhost'"),
        ({"enabled": "yes"}, "limits.enabled: expected true or false"),
        ({"burst": 1}, "limits.burst: unknown key"),
    ],
)
def test_config_errors_name_the_key(limits: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"limits": limits})
    assert message in str(err.value)


def test_defaults_load() -> None:
    settings = settings_from_dict({})
    assert settings.limits.enabled and settings.limits.sessions_per_ip_burst == 20
