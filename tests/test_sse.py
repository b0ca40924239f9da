"""SSE framing, table-driven: event, data, id and retry lines."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import sse


@pytest.mark.parametrize(
    ("name", "data", "id", "expected"),
    [
        ("status", {"a": 1}, None, b'event: status\ndata: {"a":1}\n\n'),
        ("outcome", {"s": "ok"}, "7", b'id: 7\nevent: outcome\ndata: {"s":"ok"}\n\n'),
        # a newline inside a value is escaped by JSON: one data line, never two events
        ("progress", {"stage": "a\nb"}, None, b'event: progress\ndata: {"stage":"a\\nb"}\n\n'),
        ("progress", {"name": "Åsa"}, None, 'event: progress\ndata: {"name":"Åsa"}\n\n'.encode()),
        # an id cannot smuggle a line break
        ("x", 1, "1\n2", b"id: 12\nevent: x\ndata: 1\n\n"),
    ],
)
def test_event_frames(name: str, data: Any, id: str | None, expected: bytes) -> None:
    assert sse.event(name, data, id=id) == expected


def test_retry_rides_on_an_event() -> None:
    assert sse.event("status", {}, retry=3000) == b"event: status\ndata: {}\nretry: 3000\n\n"
