"""Conversion numbers: sessions started, reached the provider, and by outcome — as metrics and `gateway stats`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.broker import Broker
from gateway.cli import main
from gateway.metrics import Metrics
from gateway.outcome import Outcome
from gateway.sessions import Sessions, new_session_id
from gateway.storage.base import Store
from gateway.storage.sqlite import SqliteStore


async def _populate(store: Store) -> Metrics:
    metrics = Metrics()
    sessions = Sessions(store, Broker(16))
    sessions.on_reached = metrics.reached_provider
    ids = {}
    names = [("seen", "truecaller"), ("ok", "truecaller"), ("gone", "truecaller"), ("vp", "veriphone")]
    for name, provider in names:
        ids[name] = new_session_id()
        await sessions.create(session_id=ids[name], provider=provider, ttl=60, phone="+15551234567")
    # the Truecaller dialog was shown twice (a repeated callback): reached once
    await sessions.progress(ids["seen"], "flow_invoked")
    await sessions.progress(ids["seen"], "flow_invoked")
    await sessions.finish(ids["seen"], Outcome("rejected", "use_another_number"))
    await sessions.progress(ids["ok"], "profile_fetching")
    await sessions.finish(ids["ok"], Outcome("verified", phone="+15551234567"))
    await sessions.finish(ids["gone"], Outcome("expired", "timeout"))  # never reached Truecaller
    await sessions.progress(ids["vp"], "result_fetching")
    return metrics


async def _populate_file(db: Path) -> None:
    store = SqliteStore(str(db))
    await store.open()
    try:
        await _populate(store)
    finally:
        await store.close()


async def test_reached_is_counted_once_per_session(store: Store) -> None:
    metrics = await _populate(store)
    text = metrics.render().decode()
    assert 'gateway_sessions_reached_provider_total{provider="truecaller"} 2.0' in text
    assert 'gateway_sessions_reached_provider_total{provider="veriphone"} 1.0' in text
    # (provider, status, reason, sessions, reached the provider), in the same order on each backend
    assert await store.conversion(0) == [
        ("truecaller", "expired", "timeout", 1, 0),
        ("truecaller", "rejected", "use_another_number", 1, 1),
        ("truecaller", "verified", None, 1, 1),
        ("veriphone", "pending", None, 1, 1),
    ]
    assert await store.conversion(9e9) == []


def test_gateway_stats_reports_conversion_without_personal_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_populate_file(tmp_path / "g.db"))
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\npath = "{tmp_path / "g.db"}"\n')
    assert main(["stats", "--since", "1h", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "truecaller\t3\t2\t0\t1\t1\t0\t1\t33.3%" in lines  # started reached pending verified rejected failed expired
    assert "veriphone\t1\t1\t1\t0\t0\t0\t0\t0.0%" in lines
    assert "truecaller\trejected\tuse_another_number\t1\t1" in lines
    assert "truecaller\texpired\ttimeout\t1\t0" in lines
    assert "+1555" not in out


@pytest.mark.parametrize("since", ["", "abc", "-5m", "0", "12x"])
def test_a_bad_since_is_a_one_line_error(tmp_path: Path, since: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\npath = "{tmp_path / "g.db"}"\n')
    assert main(["stats", f"--since={since}", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gateway: --since:") and "\n" not in err
