"""Server-Sent Events framing (WHATWG "text/event-stream"), pure and table-tested.

Frames are built once per published event and shared by every subscriber.
"""

from __future__ import annotations

import json
from typing import Any

from sse_starlette.event import ServerSentEvent

SEP = "\n"


def event(name: str, data: Any, *, id: str | None = None, retry: int | None = None) -> bytes:
    """One event frame; `data` is serialised as compact JSON (never contains a raw newline)."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return ServerSentEvent(payload, event=name, id=id, retry=retry, sep=SEP).encode()


# A comment line: EventSource ignores it; it keeps proxies and NATs from timing the stream out.
HEARTBEAT = b":\n\n"
