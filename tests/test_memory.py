from __future__ import annotations

from gateway.memory import MemoryReleaser


def test_releases_only_after_a_large_drop_from_the_peak() -> None:
    open_now = [0]
    releaser = MemoryReleaser(lambda: open_now[0], drop=100)
    for level in (50, 150, 120, 60):  # rising, then a drop of 90 from the peak of 150
        open_now[0] = level
        assert not releaser.check()
    open_now[0] = 40  # 110 below the peak
    assert releaser.check() and releaser.releases == 1
    assert not releaser.check()  # the peak was reset to the new level
    open_now[0] = 200
    assert not releaser.check()
    open_now[0] = 0
    assert releaser.check() and releaser.releases == 2
