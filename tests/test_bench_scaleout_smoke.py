"""`python -m bench --scaleout` end to end with tiny numbers, so the phase cannot rot.

It starts a durable PostgreSQL of its own (bench/pgcluster.py), gateways on SQLite and on
PostgreSQL (one process, `serve --workers 2`, and two instances for the cross-instance
delivery), the fake profile host and load generators; every one of them must be gone after.
Skipped without PostgreSQL, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from bench.pgcluster import bin_dir
from tests.test_bench_smoke import _processes_with

REPO = Path(__file__).resolve().parent.parent


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value) and value > 0


@pytest.mark.timeout(240)
def test_scaleout_phase_runs_and_reports(tmp_path: Path) -> None:
    if bin_dir() is None:
        message = "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message + "; CI must run the scale-out bench smoke test")
        pytest.skip(message)
    out = tmp_path / "scaleout.json"
    marker = f"BENCH_SMOKE_{uuid.uuid4().hex}"
    argv = [
        sys.executable, "-m", "bench", "--scaleout",
        "--streams", "20", "--sample", "8", "--duration", "1", "--concurrency", "4", "--ab-rounds", "1",
        # 1 s throughput windows, not less: each leg's CPU shares (gateway, load generators,
        # PostgreSQL) must count some 10 ms ticks even on a loaded machine.
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, env={**os.environ, marker: "1"}, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    # PostgreSQL too: runuser and pg_ctl pass the environment on to the server.
    assert _processes_with(marker) == [], "the benchmark left processes running"

    so = json.loads(out.read_text())["scaleout"]
    assert [leg["kind"] for leg in so["legs"]] == ["a", "b", "c"]
    for leg in so["legs"]:
        flow = leg["throughput"]
        assert _positive(leg["verifications_per_s"]) and flow["errors"] == 0
        assert _positive(leg["cpu_pct_of_one_core"]["gateway"])
        assert _positive(leg["cpu_pct_of_one_core"]["loadgen"])
    assert so["legs"][0]["cpu_pct_of_one_core"]["postgres"] >= 0
    assert _positive(so["legs"][1]["cpu_pct_of_one_core"]["postgres"])
    assert so["legs"][2]["gateway_processes"] == 3  # the supervisor and two workers
    assert so["postgresql"]["settings"]["fsync"] == "on"
    assert so["postgresql"]["settings"]["synchronous_commit"] == "on"
    assert so["postgresql"]["data_dir_on"] != "tmpfs"

    summary = so["summary"]
    assert _positive(summary["ratio_c_to_a"])
    assert set(summary["delivery"]) == {"sqlite", "pg-same", "pg-cross"}
    for d in summary["delivery"].values():
        assert d["delivery_ms"]["n"] == 6
        assert 0 < d["delivery_ms"]["p50"] <= d["delivery_ms"]["p99"] < 10_000
    assert [m["backend"] for m in so["memory"]] == ["sqlite", "postgresql"]
    for m in so["memory"]:
        assert m["server_open_streams"] == 20 and isinstance(m["kib_per_stream"], float)
    assert {s["exit_code"] for s in so["shutdowns"]} == {0}
    assert "(c) : (a)" in done.stdout and "stream on B, callback to A" in done.stdout
