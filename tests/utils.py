"""Helpers for end-to-end tests: a real uvicorn gateway on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp

from gateway.cli import GatewayServer, build_server
from gateway.config import Settings, settings_from_dict
from gateway.web.context import Gateway


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def make_settings(db_path: Path | str, overrides: Mapping[str, Any] | None = None) -> Settings:
    base: dict[str, Any] = {"database": {"path": str(db_path)}, "logging": {"format": "json"}}
    return settings_from_dict(merge(base, overrides or {}))


@dataclass
class Running:
    url: str
    port: int
    server: GatewayServer
    gateway: Gateway
    settings: Settings

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10, **kw)


def listening_socket() -> socket.socket:
    """A bound, listening loopback socket: clients may connect before uvicorn accepts."""
    # IPPROTO_TCP explicitly: asyncio only turns Nagle off on sockets that say so (~40 ms a request).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


@contextlib.asynccontextmanager
async def run_gateway(settings: Settings) -> AsyncIterator[Running]:
    """Serve `settings` with a real uvicorn on a free port for the duration of the block."""
    async with _serve(settings, listening_socket()) as running:
        yield running


@contextlib.asynccontextmanager
async def _serve(settings: Settings, sock: socket.socket) -> AsyncIterator[Running]:
    port = sock.getsockname()[1]
    server = build_server(settings, log_config=None)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    running = Running(f"http://127.0.0.1:{port}", port, server, server.config.app.state.gateway, settings)
    try:
        yield running
    finally:
        server.should_exit = True  # what SIGTERM does
        await asyncio.wait_for(task, 15)
        sock.close()


@contextlib.asynccontextmanager
async def serve_app(app: ASGIApp) -> AsyncIterator[str]:
    """Serve any ASGI app (e.g. a provider fake) with a real uvicorn on a free port; yields its base URL."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


class RawStream:
    """Incremental reader of a streaming response's raw bytes."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_raw()
        self.buf = b""
        self.ended = False

    async def until(self, marker: bytes, timeout: float = 5) -> bytes:
        """Read until `marker` appears after what was already consumed; returns the new bytes."""

        async def go() -> bytes:
            while marker not in self.buf:
                try:
                    self.buf += await self._chunks.__anext__()
                except StopAsyncIteration:
                    self.ended = True
                    break
            head, sep, rest = self.buf.partition(marker)
            if not sep:
                self.buf = b""
                return head
            # keep the rest of the frame after the marker up to the blank line
            end = rest.find(b"\n\n")
            cut = len(head) + len(sep) + (end + 2 if end >= 0 else len(rest))
            out, self.buf = self.buf[:cut], self.buf[cut:]
            return out

        return await asyncio.wait_for(go(), timeout)

    async def rest(self, timeout: float = 5) -> bytes:
        """Read to the end of the stream."""

        async def go() -> bytes:
            async for chunk in self._chunks:
                self.buf += chunk
            self.ended = True
            out, self.buf = self.buf, b""
            return out

        return await asyncio.wait_for(go(), timeout)


def parse_sse(raw: bytes) -> list[dict[str, str]]:
    """Parse complete SSE events from raw bytes (comments kept as {'comment': ...})."""
    events: list[dict[str, str]] = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        ev: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                ev.setdefault("comment", line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            ev[name] = ev[name] + "\n" + value if name in ev and name == "data" else value
        events.append(ev)
    return events


# --- gateway processes (the shutdown and zipapp tests run the real thing) -------------------


def free_port() -> int:
    """A loopback port that was free a moment ago, for a subprocess that binds it itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def to_toml(config: Mapping[str, Any]) -> str:
    """Nested dicts of strings, numbers, booleans and lists as TOML (JSON scalars are valid TOML)."""
    lines: list[str] = []

    def table(prefix: str, node: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in scalars.items())
        for key, value in node.items():
            if isinstance(value, Mapping):
                table(f"{prefix}.{key}" if prefix else key, value)

    table("", config)
    return "\n".join(lines) + "\n"


async def wait_ready(base_url: str, proc: asyncio.subprocess.Process, timeout: float = 20) -> None:
    """Poll GET /readyz until 200, at most `timeout` s: a subprocess has no other readiness signal."""
    async with asyncio.timeout(timeout), httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"the gateway exited with status {proc.returncode} before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.05)


# --- sandbox mode --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def run_sandbox_gateway(settings: Settings) -> AsyncIterator[Running]:
    """Like `run_gateway`, in sandbox mode: the socket is bound first so the fakes know the real port."""
    from gateway.sandbox import apply_sandbox

    sock = listening_socket()
    settings = apply_sandbox(settings, ("127.0.0.1", sock.getsockname()[1]))
    async with _serve(settings, sock) as running:
        yield running
