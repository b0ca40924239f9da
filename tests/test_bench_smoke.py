"""The benchmark (`python -m bench`) end to end with tiny numbers.

It starts the real gateway, the fake profile host, the yardstick and load-generator processes,
so this also checks that every process it starts is gone afterwards.
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

REPO = Path(__file__).resolve().parent.parent


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(int(entry))
    return found


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    marker = f"BENCH_SMOKE_{uuid.uuid4().hex}"
    env = {**os.environ, marker: "1"}
    argv = [
        sys.executable, "-m", "bench",
        "--streams", "50", "--sample", "10", "--duration", "0.3", "--cpu-window", "0.2",
        "--concurrency", "4", "--poll-sessions", "4", "--poll-interval", "0.5", "--leak-cycles", "1",
        # Every phase runs, with short waits: the smoke test reads no memory reading's size
        # closely and needs no machine floor of 200 samples (about 10 s saved).
        "--settle-scale", "0.05", "--floor-samples", "20",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _processes_with(marker) == [], "the benchmark left processes running"
    return json.loads(out.read_text()), done.stdout


@pytest.mark.timeout(60)
def test_every_section_has_sane_numbers(smoke: tuple[dict[str, Any], str]) -> None:
    results, stdout = smoke
    assert {"meta", "streams", "throughput", "polling", "startup", "targets"} <= results.keys()

    (s,) = results["streams"]
    assert s["n"] == 50
    assert s["open"]["streams"] == 50 and s["open"]["errors"] == 0
    assert s["server_open_streams"] == 50
    assert _positive(s["open"]["streams_per_s"])
    assert isinstance(s["kib_per_stream"], float)
    assert s["memory"]["streams"]["rss_kib"] > 10_000
    assert s["idle_cpu"]["cpu_pct_of_one_core"] >= 0
    lat, b2b = s["latency"], s["latency_back_to_back"]
    assert (lat["samples"], b2b["samples"]) == (7, 3) and lat["errors"] == b2b["errors"] == 0
    assert (lat["gap_s"], b2b["gap_s"]) == (0.01, 0.0)
    for one in (lat, b2b):
        assert 0 < one["e2e_ms"]["p50"] <= one["e2e_ms"]["p99"] <= one["e2e_ms"]["max"] < 10_000
        assert _positive(one["callback_answer_ms"]["p50"])
    floor = s["floor_10ms_pace"]
    assert _positive(floor["healthz_rtt_ms"]["p50"]) and _positive(floor["fdatasync_4k_ms"]["p50"])
    assert s["holder_streams_alive_before_close"] == 40
    assert s["server_open_streams_after_close"] == 0
    assert "delta_after_close_kib" in s["leak"]

    flow = results["throughput"]
    assert _positive(flow["verifications_per_s"]) and flow["errors"] == 0
    assert flow["profiles_served_by_fake"] >= flow["completed"]
    assert _positive(flow["yardstick"]["requests_per_s"])
    assert _positive(flow["ratio_to_yardstick"])

    for mode in ("poll", "sse"):
        p = results["polling"][mode]
        assert p["verifications"] == 4 and p["errors"] == 0
        assert _positive(p["time_to_outcome_ms"]["mean"])
        assert p["requests_per_verification"] >= 2
    assert (
        results["polling"]["sse"]["time_to_outcome_ms"]["mean"]
        < results["polling"]["poll"]["time_to_outcome_ms"]["mean"]
    )

    start = results["startup"]
    assert 0 < start["fresh_ready_median_s"] < 30
    assert _positive(start["restart_ready_s"])
    assert {x["exit_code"] for x in start["shutdowns"]} == {0}

    names = {t["name"] for t in results["targets"]}
    assert len(names) == 7
    assert all(isinstance(t["met"], bool) for t in results["targets"])
    assert "Metric" in stdout and "Complete verifications per second" in stdout


def test_report_renders_markdown_from_the_json(
    smoke: tuple[dict[str, Any], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.__main__ import main

    results, _ = smoke
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert main(["--report", str(path), "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert "| Metric | Measured | Target | Result |" in printed
    assert "[N=50]" in printed
