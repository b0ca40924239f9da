"""`GET /metrics`: every gateway metric is exported, and the counters move with the traffic."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from gateway.outcome import REJECTED, VERIFIED, Outcome
from tests.utils import RawStream, make_settings, run_gateway

pytestmark = pytest.mark.timeout(10)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """(family names, {(sample name, labels): value}) of a Prometheus text exposition."""
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name for f in families}, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_scrape_after_sessions_reports_counts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "gw.db", {"providers": {"veriphone": {"enabled": False}}})
    async with run_gateway(settings) as gw, gw.client() as client:
        ids = []
        for _ in range(3):
            r = await client.post("/v1/sessions", json={"provider": "truecaller", "phone": "+919812345670"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        assert await gw.gateway.sessions.finish(ids[0], Outcome(REJECTED, "user_rejected"))
        assert await gw.gateway.sessions.finish(ids[1], Outcome(VERIFIED, phone="+919812345670"))
        async with client.stream("GET", f"/v1/sessions/{ids[2]}/events") as stream:
            await RawStream(stream).until(b"event: status")
            response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names, samples = parse(response.text)
    assert {
        "gateway_sessions_created",
        "gateway_outcomes",
        "gateway_open_streams",
        "gateway_callback_seconds",
        "gateway_provider_fetch_seconds",
        "gateway_provider_errors",
        "gateway_db_write_seconds",
    } <= names
    assert value(samples, "gateway_sessions_created_total", provider="truecaller") == 3
    assert value(samples, "gateway_sessions_created_total", provider="veriphone") == 0
    assert (
        value(samples, "gateway_outcomes_total", provider="truecaller", status="rejected", reason="user_rejected") == 1
    )
    assert value(samples, "gateway_outcomes_total", provider="truecaller", status="verified", reason="") == 1
    assert value(samples, "gateway_open_streams") == 1
    # 3 inserts and 2 outcomes at least (the retention pass at start writes too).
    assert value(samples, "gateway_db_write_seconds_count") >= 5
    assert 0 < value(samples, "gateway_db_write_seconds_sum") < 5
    # Provider histograms exist from the start, at zero, for rate() and alerting.
    assert value(samples, "gateway_callback_seconds_count", provider="truecaller") == 0
    assert value(samples, "gateway_provider_fetch_seconds_count", provider="truecaller", operation="profile") == 0
    assert value(samples, "gateway_provider_fetch_seconds_count", provider="veriphone", operation="result") == 0


def test_helpers_record_into_their_series() -> None:
    metrics = Metrics()
    metrics.callback_handled("truecaller", 0.004)
    metrics.fetched("veriphone", "result", 0.3)
    metrics.provider_error("veriphone", "timeout")
    metrics.db_write_seconds.observe(0.002)
    _, samples = parse(metrics.render().decode())
    assert value(samples, "gateway_callback_seconds_count", provider="truecaller") == 1
    assert value(samples, "gateway_callback_seconds_bucket", provider="truecaller", le="0.005") == 1
    assert value(samples, "gateway_provider_fetch_seconds_sum", provider="veriphone", operation="result") == 0.3
    assert value(samples, "gateway_provider_errors_total", provider="veriphone", kind="timeout") == 1
    assert value(samples, "gateway_db_write_seconds_count") == 1
