"""Logging: one JSON object per line, or a readable line when stdout is a terminal.

Only fields passed explicitly through `extra=` are added; callers never pass personal data
(phone numbers, names, tokens, nonces, uuids, session ids — use `sessions.public_ref`).
Requests are logged by `gateway.web.accesslog` with their route template; uvicorn's own access
log stays off, and its error logger has URL paths scrubbed from its arguments.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from gateway.config import LoggingConfig

# uvicorn's color_message duplicates msg with ANSI codes.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
_NO_WEBSOCKETS = "No supported WebSocket library detected."


class ScrubPaths(logging.Filter):
    """For uvicorn's loggers: drop URL paths from arguments (they carry session ids and nonces)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple("<path>" if isinstance(a, str) and a.startswith("/") else a for a in record.args)
        if isinstance(record.msg, str) and record.msg.startswith(_NO_WEBSOCKETS):
            # The server is run with ws="none" on purpose; uvicorn's advice to install a library misleads.
            record.msg = "WebSocket upgrade refused: the gateway serves no WebSockets"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the `extra=` fields, exc."""

    # Every request is logged, so the per-record cost matters: one reused encoder, and the
    # date part of the timestamp formatted once per second (strftime is the slowest step).
    _encode = json.JSONEncoder(default=str, separators=(",", ":")).encode

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        entry: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self._encode(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        )
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.name}: "
        line += record.getMessage() + (f"  {extras}" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(cfg: LoggingConfig, stream: Any = None) -> None:
    stream = sys.stdout if stream is None else stream
    fmt = cfg.format
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    # Neither formatter prints thread or process names; not collecting them saves a few
    # microseconds per record (the logging HOWTO's "Optimization" section).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        # Filters apply only to records logged on their own logger, hence one per logger.
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, ScrubPaths)] + [ScrubPaths()]
    logging.getLogger("uvicorn.access").disabled = True
    # Third-party chatter that would carry personal data even at logging.level = debug:
    # httpx INFO lines have full URLs, aiosqlite DEBUG lines have SQL parameters (session ids).
    for name in ("httpx", "httpcore", "aiosqlite"):
        logging.getLogger(name).setLevel(logging.WARNING)
