"""The in-process broker: per-session fan-out, waits with timeouts, slow subscribers dropped."""

from __future__ import annotations

import asyncio

from gateway.broker import CLOSED, TIMEOUT, Broker, Event


def ev(i: int, kind: str = "progress") -> Event:
    return Event(id=i, kind=kind, frame=b"f%d" % i, data={})


async def test_publish_reaches_only_that_sessions_subscribers() -> None:
    b = Broker(4)
    a1, a2, other = b.subscribe("a"), b.subscribe("a"), b.subscribe("b")
    assert b.publish("a", ev(1)) == 2
    assert [e.id for e in a1.drain()] == [1]
    assert [e.id for e in a2.drain()] == [1]
    assert other.drain() == []
    assert b.publish("nobody", ev(2)) == 0


async def test_wait_wakes_on_event_and_times_out() -> None:
    b = Broker(4)
    sub = b.subscribe("s")
    assert await sub.wait(0.01) == TIMEOUT
    waiter = asyncio.ensure_future(sub.wait(5))
    await asyncio.sleep(0)  # let it park
    b.publish("s", ev(1))
    assert await asyncio.wait_for(waiter, 1) == "event"
    assert [e.id for e in sub.drain()] == [1]


async def test_slow_subscriber_is_dropped_not_waited_for() -> None:
    b = Broker(2)
    slow = b.subscribe("s")
    fast = b.subscribe("s")
    for i in range(3):
        b.publish("s", ev(i))
        fast.drain()
    assert slow.close_reason == "overflow"
    assert await slow.wait(5) == CLOSED
    assert b.count() == 1  # the slow one is gone, the fast one stays


async def test_close_all_ends_every_wait_and_refuses_new_subscribers() -> None:
    b = Broker(4)
    subs = [b.subscribe(str(i)) for i in range(3)]
    waits = [asyncio.ensure_future(s.wait(5)) for s in subs]
    await asyncio.sleep(0)
    b.close_all()
    assert await asyncio.wait_for(asyncio.gather(*waits), 1) == [CLOSED] * 3
    assert b.count() == 0
    late = b.subscribe("x")
    assert late.close_reason == "shutdown" and b.count() == 0


async def test_closed_subscribers_are_forgotten() -> None:
    b = Broker(4)
    sub = b.subscribe("s")
    sub.close("done")
    assert b.count() == 0 and b.publish("s", ev(1)) == 0
