"""Optional CPU profiles of the gateway with py-spy (`python -m bench --profile`).

py-spy samples the running gateway from outside (`--nonblocking`: the gateway is never
paused). The collapsed stacks are written to the results directory and summarised here:
the functions where samples were taken (self), the ones on the stack (inclusive), and
inclusive shares for a few areas of interest (SQLite, HTTP parsing, Starlette, ...).
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

AREAS = {
    "sqlite (aiosqlite reads + writer thread)": ("aiosqlite", "gateway/storage/sqlite.py", "sqlite3"),
    "uvicorn + httptools": ("uvicorn/",),
    "starlette routing/middleware": ("starlette/",),
    "gateway access log": ("gateway/web/accesslog.py",),
    "httpx/httpcore (profile fetch)": ("httpx/", "httpcore/", "h11/", "bench/httpx_profile_client.py"),
    "lean profile client (profile fetch)": ("providers/truecaller/profile_client.py",),
    "anyio": ("anyio/",),
    "asyncio event loop": ("asyncio/",),
    "json": ("json/",),
    "logging": ("logging/",),
}


def pyspy_binary() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, out: Path, rate: int = 200, gil: bool = False) -> None:
        """Sample every busy thread, or with `gil` only the thread holding the GIL."""
        exe = pyspy_binary()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.out = out
        self.rate = rate
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--nonblocking",
                "--threads",
                *(["--gil"] if gil else []),
                "-r",
                str(rate),
                "-f",
                "raw",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl+C
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.out.exists():
            return {"error": err.decode(errors="replace")[-500:]}
        return summarise(self.out, expected_per_thread=self.rate * elapsed)


def _frame_key(frame: str) -> str:
    # "name (path/to/file.py:123)" → "name (file.py)" with a short path
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def summarise(path: Path, top: int = 15, expected_per_thread: float = 0.0) -> dict[str, Any]:
    """Top functions and areas; per thread, the share of the recording it was busy (not idle)."""
    threads: collections.Counter[str] = collections.Counter()
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            thread = frames.pop(0)
            name = thread.split(": ", 1)[1] if ": " in thread else thread
            threads[re.sub(r"-\d+\b", "-N", name)] += count
            if not frames:
                continue
        self_counts[_frame_key(frames[-1])] += count
        for key in {_frame_key(f) for f in frames}:
            incl[key] += count
        for area, needles in AREAS.items():
            if any(n in stack for n in needles):
                areas[area] += count

    def pct(c: int) -> float:
        return round(100.0 * c / total, 1) if total else 0.0

    return {
        "file": str(path),
        "samples": total,
        "self_top": [(k, pct(v)) for k, v in self_counts.most_common(top)],
        "inclusive_top": [(k, pct(v)) for k, v in incl.most_common(top)],
        "areas_inclusive_pct": {k: pct(v) for k, v in areas.most_common()},
        # samples in which the thread was running, over the samples a always-busy thread gets
        "thread_busy_pct": {
            k: round(100.0 * v / expected_per_thread, 1) if expected_per_thread else None
            for k, v in threads.most_common()
        },
    }
