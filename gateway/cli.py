"""`gateway serve|migrate` (also `python -m gateway`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Literal

import uvicorn

from gateway.config import Settings, load_settings
from gateway.errors import ConfigError, GatewayError
from gateway.outcome import rfc3339
from gateway.storage.base import Store
from gateway.storage.sqlite import apply_migrations
from gateway.workers import MAX_WORKERS, bind, supervise

log = logging.getLogger("gateway")


class GatewayServer(uvicorn.Server):
    """uvicorn's server, but streams are told to end before uvicorn waits for connections."""

    def __init__(self, config: uvicorn.Config, on_shutdown: list[object]) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for hook in self._on_shutdown:
            if callable(hook):
                hook()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process
        # would die by the signal (status 143); the contract says a SIGTERM stop exits 0.
        # A no-op handler installed around uvicorn's turns that re-raise into nothing.
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        previous = signal.signal(signal.SIGTERM, _sigterm_after_shutdown)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_after_shutdown(sig: int, frame: FrameType | None) -> None:
    """uvicorn's re-raised SIGTERM: the graceful shutdown already happened."""


def build_server(settings: Settings, *, log_config: dict[str, object] | None = None) -> GatewayServer:
    from gateway.app import create_app

    app = create_app(settings)
    gateway = app.state.gateway
    # With limits on, a request's head is bounded in size and time before the app sees it.
    http: type[asyncio.Protocol] | Literal["auto"] = "auto"
    if settings.limits.enabled:
        from gateway.web.protocol import guarded_protocol

        http = guarded_protocol(settings.limits, gateway.metrics.limited)
    config = uvicorn.Config(
        app,
        http=http,
        host=settings.server.host,
        port=settings.server.port,
        log_config=log_config,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.server.shutdown_timeout)),
        server_header=False,
        proxy_headers=False,
        # No WebSocket routes; uvicorn's WebSocket code would log raw request paths (session ids).
        ws="none",
    )
    return GatewayServer(config, [gateway.begin_shutdown])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Phone-verification gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server (applies pending migrations first)")
    serve.add_argument("--config", help="config file (default: $GATEWAY_CONFIG, then ./config.toml)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--sandbox", action="store_true", help="mount fake providers; no credentials needed")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run this many gateway processes on the port (PostgreSQL only: [database] url)",
    )
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker of --workers
    migrate = sub.add_parser("migrate", help="apply pending database migrations and exit")
    migrate.add_argument("--config", help="config file (default: $GATEWAY_CONFIG, then ./config.toml)")
    hooks = sub.add_parser("webhooks", help="list or resend the outcome webhooks of the outbox")
    hooks_sub = hooks.add_subparsers(dest="action", required=True)
    listing = hooks_sub.add_parser("list", help="the newest webhooks, with their state (never their payload)")
    listing.add_argument("--failed", action="store_true", help="only those that failed for good")
    listing.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    retry = hooks_sub.add_parser("retry", help="send failed webhooks again, from now, with fresh attempts")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", help="the webhook-id (msg_...) to send again")
    which.add_argument("--all-failed", action="store_true", help="every failed webhook")
    doctor = sub.add_parser("doctor", help="check, through the public URL, that the proxy keeps streams working")
    doctor.add_argument("url", help="the gateway's public base URL, e.g. https://verify.example.com")
    doctor.add_argument("--direct", help="its direct address, to compare the first event's time with")
    doctor.add_argument("--origin", action="append", default=[], help="a site origin to check CORS for (repeatable)")
    doctor.add_argument("--timeout", type=float, default=30.0, help="seconds any one check may take (default 30)")
    doctor.add_argument("--config", help="config file: stream.heartbeat and server.cors_allow_origins come from it")
    stats = sub.add_parser("stats", help="conversion per provider from the database: started, reached, outcomes")
    stats.add_argument("--since", default="24h", help="how far back, e.g. 90m, 24h, 7d (default 24h)")
    for command in (listing, retry, stats):
        command.add_argument("--config", help="config file (default: $GATEWAY_CONFIG, then ./config.toml)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.command == "migrate":
            if settings.database.url:
                asyncio.run(_migrate_shared(settings))
                return 0
            applied = apply_migrations(settings.database.path, settings.database.busy_timeout)
            print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
            return 0
        if args.command == "webhooks":
            return asyncio.run(_webhooks(settings, args))
        if args.command == "doctor":
            from gateway.doctor import doctor

            if not 0 < args.timeout <= 600:
                raise ConfigError(f"--timeout: expected seconds > 0 and <= 600, got {args.timeout}")
            origins = args.origin or list(settings.server.cors_allow_origins)
            return doctor(
                args.url, direct=args.direct, origins=origins, heartbeat=settings.stream.heartbeat, timeout=args.timeout
            )
        if args.command == "stats":
            return asyncio.run(_stats(settings, _duration("--since", args.since)))
        settings = _apply_overrides(settings, args)
        _check_workers(settings, args.workers)
    except GatewayError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    from gateway.logs import configure_logging

    configure_logging(settings.logging)
    if args.workers > 1:
        listen = settings.server
        return supervise(sys.argv[1:] if argv is None else argv, args.workers, listen.host, listen.port)
    sockets: list[socket.socket] | None = None
    if settings.sandbox or args.reuse_port:
        # Bind before building the app, so the sandbox's self-pointing URLs carry the
        # real port (port 0 included); uvicorn then serves on this socket. A worker of
        # --workers binds the port its siblings share.
        try:
            sockets = [bind(settings.server.host, settings.server.port, reuse_port=args.reuse_port)]
        except OSError as exc:
            print(f"gateway: cannot listen on {settings.server.host}:{settings.server.port}: {exc}", file=sys.stderr)
            return 1
    if settings.sandbox and sockets:
        from gateway.sandbox import apply_sandbox

        settings = apply_sandbox(settings, sockets[0].getsockname()[:2])
    server = build_server(settings)
    tune_gc()
    try:
        server.run(sockets=sockets)  # uvicorn's loop factory: uvloop when installed
    except KeyboardInterrupt:  # pragma: no cover - second Ctrl+C
        return 130
    return 0 if server.started else 1


def _store(settings: Settings) -> Store:
    from gateway.app import make_store

    return make_store(settings.database)


async def _migrate_shared(settings: Settings) -> None:
    """PostgreSQL: opening the store applies what is pending, under an advisory lock."""
    store = _store(settings)
    await store.open()
    await store.close()
    print("migrations applied (PostgreSQL)")


async def _webhooks(settings: Settings, args: argparse.Namespace) -> int:
    """`gateway webhooks list|retry`: on the same database the gateway uses, safe while it runs."""
    store = _store(settings)
    await store.open()
    try:
        if args.action == "retry":
            count = await store.outbox_retry(None if args.all_failed else args.id, now=time.time())
            print(f"{count} webhook(s) will be sent again")
            return 0 if count or args.all_failed else 1
        if not 1 <= args.limit <= 100_000:
            raise ConfigError(f"--limit: expected 1-100000, got {args.limit}")
        rows = await store.outbox_list(failed_only=args.failed, limit=args.limit)
    finally:
        await store.close()
    print("id\tstatus\tattempts\tenqueued_at\tnext_attempt_at\tfinished_at\tlast_status\tlast_error")
    for r in rows:
        finished = rfc3339(r.finished_at) if r.finished_at else "-"
        print(
            f"{r.id}\t{r.status}\t{r.attempts}\t{rfc3339(r.enqueued_at)}\t{rfc3339(r.next_attempt_at)}"
            f"\t{finished}\t{r.last_status or '-'}\t{r.last_error or '-'}"
        )
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def _duration(flag: str, text: str) -> float:
    """`90m`, `24h`, `7d` or plain seconds."""
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{flag}: expected a duration such as 90m, 24h or 7d, got {text!r}")
    return seconds


async def _stats(settings: Settings, since: float) -> int:
    """`gateway stats`: how many sessions started, reached the provider, and ended how (no personal data)."""
    store = _store(settings)
    await store.open()
    try:
        rows = await store.conversion(time.time() - since)
    finally:
        await store.close()
    totals: dict[str, dict[str, int]] = {}
    for provider, status, _, count, reached in rows:
        entry = totals.setdefault(provider, {"started": 0, "reached": 0})
        entry["started"] += count
        entry["reached"] += reached
        entry[status] = entry.get(status, 0) + count
    print(f"sessions created in the last {since / 3600:g} h")
    columns = ("started", "reached", "pending", "verified", "rejected", "failed", "expired")
    print("provider\t" + "\t".join(columns) + "\tconversion")
    for provider, entry in totals.items():
        share = f"{entry.get('verified', 0) / entry['started']:.1%}" if entry["started"] else "-"
        print(provider + "\t" + "\t".join(str(entry.get(c, 0)) for c in columns) + "\t" + share)
    print("\nprovider\tstatus\treason\tsessions\treached")
    for provider, status, reason, count, reached in rows:
        print(f"{provider}\t{status}\t{reason or '-'}\t{count}\t{reached}")
    return 0


def tune_gc() -> None:
    """Collect young objects less often: every open stream adds long-lived objects, and with
    the default thresholds the collector's passes over them cost about half the CPU of opening
    10,000 streams (docs/BENCHMARKS.md). The gateway creates few reference cycles."""
    gc.collect()
    gc.freeze()  # what start-up built lives as long as the process: never scan it again
    gc.set_threshold(100_000, 50, 100)


def _check_workers(settings: Settings, workers: int) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers: expected 1-{MAX_WORKERS}, got {workers}")
    if workers > 1 and not settings.database.url:
        raise ConfigError(
            f"--workers {workers}: SQLite is one process's file and its streams are told by that process"
            " alone; set [database] url (PostgreSQL) to run several workers"
        )


def _apply_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    server = settings.server
    if args.host is not None:
        server = dataclasses.replace(server, host=args.host)
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port: expected a port number 0-65535, got {args.port}")
        server = dataclasses.replace(server, port=args.port)
    return dataclasses.replace(settings, server=server, sandbox=bool(args.sandbox))
