"""Prometheus metrics, one registry per app (no module-level collectors).

Exported (the `_total` / `_bucket` suffixes are added by the exposition format):
  gateway_sessions_created_total{provider}            api.create_session
  gateway_outcomes_total{provider,status,reason}      Sessions.on_outcome
  gateway_open_streams                                 set from the broker at scrape time
  gateway_callback_seconds{provider}                   provider callback handlers
  gateway_provider_fetch_seconds{provider,operation}   Truecaller profile / Veriph.One result fetches
  gateway_provider_errors_total{provider,kind}         failed provider calls
  gateway_db_write_seconds                             Database.on_write_seconds (queue → durable commit)
  gateway_database_bytes                               disk.DiskCap (pages in use + WAL; for database.max_size_mb)
  gateway_instance_info{instance,worker}              this process (host:pid; worker of serve --workers)
  gateway_listener_up                                  PostgreSQL LISTEN connection up (set at scrape time)
  gateway_limited_total{limit}                         requests refused by an abuse limit ([limits] key)
"""

from __future__ import annotations

import os
import socket
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The `limit` label values of gateway_limited_total: the [limits] key that refused.
LIMITS = (
    "sessions_per_ip",
    "sessions_per_phone",
    "max_pending_sessions",
    "callbacks_per_ip",
    "streams_per_ip",
    "streams_total",
    "long_polls_per_ip",
    "long_polls_total",
    "body_timeout",
    "header_timeout",
    "max_header_bytes",
    "max_query_bytes",
)
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_created = Counter("gateway_sessions_created", "Sessions created", ["provider"], registry=r)
        self.reached = Counter(
            "gateway_sessions_reached_provider",
            "Sessions whose user reached the provider (Truecaller dialog shown, Veriph.One result pulled)",
            ["provider"],
            registry=r,
        )
        self.outcomes = Counter("gateway_outcomes", "Terminal outcomes", ["provider", "status", "reason"], registry=r)
        self.open_streams = Gauge("gateway_open_streams", "SSE streams open now", registry=r)
        self.callback_seconds = Histogram(
            "gateway_callback_seconds", "Time to answer a provider callback", ["provider"], buckets=_FAST, registry=r
        )
        self.fetch_seconds = Histogram(
            "gateway_provider_fetch_seconds",
            "Time of profile / result fetches from providers",
            ["provider", "operation"],
            buckets=_FAST,
            registry=r,
        )
        self.provider_errors = Counter(
            "gateway_provider_errors", "Provider calls that failed", ["provider", "kind"], registry=r
        )
        self.db_write_seconds = Histogram(
            "gateway_db_write_seconds", "Time from queueing a write to its durable commit", buckets=_FAST, registry=r
        )
        self.webhook_deliveries = Counter(
            "gateway_webhook_deliveries",
            "Webhook attempts by what became of the row: delivered, retried, failed",
            ["result"],
            registry=r,
        )
        self.webhook_attempts = Counter("gateway_webhook_attempts", "Webhook HTTP attempts made", registry=r)
        self.database_bytes = Gauge(
            "gateway_database_bytes", "Bytes the database holds, measured at most once a second", registry=r
        )
        self.webhook_oldest_pending = Gauge(
            "gateway_webhook_oldest_pending_seconds", "Age of the oldest undelivered webhook (0: none)", registry=r
        )

        self.limited_requests = Counter(
            "gateway_limited", "Requests refused by an abuse limit, by its [limits] key", ["limit"], registry=r
        )

        # Which process answers a scrape: several instances (or --workers) each have their own.
        self.instance_info = Gauge(
            "gateway_instance_info",
            "1, labelled with this process: host:pid, and its worker number under serve --workers",
            ["instance", "worker"],
            registry=r,
        )
        self.instance_info.labels(f"{socket.gethostname()}:{os.getpid()}", os.environ.get("GATEWAY_WORKER", "")).set(1)
        self.listener_up = Gauge(
            "gateway_listener_up", "1 while the shared database's event feed is up (PostgreSQL only)", registry=r
        )

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Known series start at zero, so rate() and absent() work before the first event.
        for provider in ("truecaller", "veriphone"):
            self.sessions_created.labels(provider)
            self.reached.labels(provider)
            self.callback_seconds.labels(provider)
        for result in ("delivered", "retried", "failed"):
            self.webhook_deliveries.labels(result)
        self.fetch_seconds.labels("truecaller", "profile")
        for limit in LIMITS:
            self.limited_requests.labels(limit)
        self.fetch_seconds.labels("veriphone", "result")

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: `labels()` costs a lock and a few µs per call
        on the hot path. Label values come from small fixed sets, so this stays small."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def session_created(self, provider: str) -> None:
        self._child(self.sessions_created, provider).inc()

    def reached_provider(self, provider: str) -> None:
        self._child(self.reached, provider).inc()

    def outcome(self, provider: str, status: str, reason: str | None) -> None:
        self._child(self.outcomes, provider, status, reason or "").inc()

    def callback_handled(self, provider: str, seconds: float) -> None:
        self._child(self.callback_seconds, provider).observe(seconds)

    def fetched(self, provider: str, operation: str, seconds: float) -> None:
        self._child(self.fetch_seconds, provider, operation).observe(seconds)

    def provider_error(self, provider: str, kind: str) -> None:
        self.provider_errors.labels(provider, kind).inc()

    def limited(self, limit: str) -> None:
        self._child(self.limited_requests, limit).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
