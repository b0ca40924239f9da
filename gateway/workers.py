"""`gateway serve --workers N`: N gateway processes on one port, so a VM uses all its cores.

Each worker is a whole gateway (`gateway serve` again, with `--reuse-port`) that binds the
same address with SO_REUSEPORT; the kernel spreads new connections over the workers'
listening sockets. They share nothing but the PostgreSQL database: its LISTEN/NOTIFY feed
brings an outcome committed by one worker to a stream held by another, so SQLite (one
process's file) is refused. The parent only supervises: it keeps the port reserved (bound,
never listening, so it is handed no connection), restarts a worker that dies (after a
growing pause), and on SIGTERM or SIGINT passes the signal on and waits for every worker's
graceful stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger("gateway.workers")

MAX_WORKERS = 64
# A worker that dies this soon after its start counts as a crash loop: the pause doubles.
_QUICK_DEATH = 10.0
_MAX_PAUSE = 30.0


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """Bind (not yet listen) the server socket the way uvicorn would, so its real port is known now.

    With `reuse_port`, several processes may bind the same address (SO_REUSEPORT).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does for uvicorn
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def worker_argv(argv: Sequence[str], port: int) -> list[str]:
    """`gateway serve …` for one worker: the same options, no --workers, the parent's port."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--port"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--port=")):
            continue
        out.append(arg)
    return [*out, "--port", str(port), "--reuse-port"]


class Supervisor:
    """Runs `count` workers until SIGTERM/SIGINT; returns 0 if every worker then stopped cleanly."""

    def __init__(self, command: list[str], count: int) -> None:
        self.command = command
        self.count = count
        self.stopping = threading.Event()
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    def _spawn(self, slot: int) -> None:
        env = {**os.environ, "GATEWAY_WORKER": str(slot)}
        self._procs[slot] = subprocess.Popen(self.command, env=env)  # noqa: S603 - ourselves again

    def _signal(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.set()
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._signal)
        started: dict[int, float] = {}
        pause: dict[int, float] = {}
        for slot in range(self.count):
            self._spawn(slot)
            started[slot] = time.monotonic()
        status = 0
        while True:
            if self.stopping.is_set():
                for proc in self._procs.values():
                    code = proc.wait()
                    status = status or (0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else 1)
                return status
            for slot, proc in list(self._procs.items()):
                polled = proc.poll()
                if polled is None or self.stopping.is_set():
                    continue
                code = polled
                quick = time.monotonic() - started[slot] < _QUICK_DEATH
                pause[slot] = min(max(pause.get(slot, 0.5) * 2, 1.0), _MAX_PAUSE) if quick else 0.5
                log.warning("worker %d exited with status %d; restarting in %.1f s", slot, code, pause[slot])
                if self.stopping.wait(pause[slot]):
                    break
                self._spawn(slot)
                started[slot] = time.monotonic()
            self.stopping.wait(0.2)


def supervise(argv: Sequence[str], count: int, host: str, port: int) -> int:
    """Reserve host:port, then run `count` workers of `gateway serve` on it."""
    try:
        reserved = bind(host, port, reuse_port=True)
    except OSError as exc:
        print(f"gateway: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    try:
        real_port = reserved.getsockname()[1]
        command = [sys.executable, "-m", "gateway", *worker_argv(argv, real_port)]
        log.info("starting workers", extra={"workers": count, "port": real_port})
        return Supervisor(command, count).run()
    finally:
        reserved.close()
