"""The memory releaser: a full collection and malloc_trim only after a large drop of open streams."""

from __future__ import annotations

from gateway.broker import Broker
from gateway.memory import MemoryReleaser


class Counter:
    """Stands in for the broker: `level` is what is open now, `peak` the most since the last look."""

    def __init__(self) -> None:
        self.level = 0
        self.peak = 0

    def set(self, level: int) -> None:
        self.level = level
        self.peak = max(self.peak, level)

    def count(self) -> int:
        return self.level

    def take_peak(self) -> int:
        peak, self.peak = self.peak, self.level
        return peak


def test_releases_only_after_a_large_drop_from_the_peak() -> None:
    streams = Counter()
    releaser = MemoryReleaser(streams, drop=100)
    for level in (50, 150, 120, 60):  # rising, then a drop of 90 from the peak of 150
        streams.set(level)
        assert not releaser.check()
    streams.set(40)  # 110 below the peak
    assert releaser.check() and releaser.releases == 1
    assert not releaser.check()  # the peak was reset to the new level
    streams.set(200)
    assert not releaser.check()
    streams.set(0)
    assert releaser.check() and releaser.releases == 2


def test_a_wave_between_two_checks_is_seen() -> None:
    """Streams that open and close between two checks still count (the leak check's reopen rounds)."""
    streams = Counter()
    releaser = MemoryReleaser(streams, drop=100)
    assert not releaser.check()
    streams.set(5_000)
    streams.set(0)
    assert releaser.check() and releaser.releases == 1


def test_the_broker_keeps_its_peak_until_taken() -> None:
    broker = Broker()
    subs = [broker.subscribe(f"s{i}") for i in range(3)]
    for sub in subs[:2]:
        sub.close("done")
    assert broker.count() == 1
    assert broker.take_peak() == 3
    assert broker.take_peak() == 1  # restarted from what is open now
    subs[2].close("done")
    assert (broker.count(), broker.take_peak()) == (0, 1)
