"""Subprocesses (gateway, fake profile host, yardstick) and what /proc says about them."""

from __future__ import annotations

import contextlib
import http.client
import os
import platform
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class Service:
    """One subprocess we started; `stop()` is safe to call more than once."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_after: float = float("nan")  # seconds from spawn to the first 200 from /readyz
    stop_seconds: float = float("nan")
    exit_code: int | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        self._log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        # A session of its own: a Ctrl+C on the terminal reaches the benchmark, which then
        # stops this process with SIGTERM (a graceful stop it can also time).
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, path: str = "/readyz", timeout: float = 30.0, interval: float = 0.005) -> float:
        """Poll `path` until it answers 200 (bounded); returns seconds since the spawn."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise BenchError(f"{self.name} exited with status {code} before it was ready:\n{self.log_tail()}")
            try:
                status, _ = http_get(self.port, path, timeout=1.0)
                if status == 200:
                    self.ready_after = time.monotonic() - self.started_at
                    return self.ready_after
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(interval)

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                self.exit_code = proc.returncode
            self._close_log()
            return
        t0 = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
            self.stop_seconds = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
        self.exit_code = proc.returncode
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]


# -- /proc ----------------------------------------------------------------------------------
def _status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {name}")


def rss_kib(pid: int) -> int:
    return _status_field(pid, "VmRSS")


def threads(pid: int) -> int:
    return _status_field(pid, "Threads")


def pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) seconds summed over all cores since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already part of user
    return (total - idle) / CLK_TCK, total / CLK_TCK


class CpuMeter:
    """CPU used by a process, and by the whole machine, between `start()` and `stop()`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.p0 = cpu_seconds(self.pid)
        self.m0 = machine_cpu()[0]

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        used = cpu_seconds(self.pid) - self.p0
        machine = machine_cpu()[0] - self.m0
        return {
            "window_s": wall,
            "cpu_s": used,
            "cpu_pct_of_one_core": 100 * used / wall,
            # everything on the machine (gateway, load generators, anything else running), in one-core %
            "machine_busy_pct_of_one_core": 100 * machine / wall,
        }


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def event_loop_of(pid: int) -> str:
    """`uvloop` if the process has uvloop's extension mapped, else `asyncio`."""
    try:
        with open(f"/proc/{pid}/maps") as fh:
            maps = fh.read()
    except OSError:
        return "unknown"
    return "uvloop" if "uvloop/loop." in maps else "asyncio"


def memory(pid: int) -> dict[str, int | None]:
    return {"rss_kib": rss_kib(pid), "pss_kib": pss_kib(pid)}


def machine() -> dict[str, object]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_total = 0
    with contextlib.suppress(OSError, BenchError):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1])
    versions: dict[str, str] = {}
    for dist in ("uvicorn", "starlette", "httptools", "uvloop", "sse-starlette", "aiosqlite", "httpx"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_mib": mem_total // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "versions": versions,
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


def fdatasync_ms(directory: Path, gap: float, count: int) -> list[float]:
    """Overwrite 4 KiB of a file in `directory` and fdatasync it, `count` times `gap` s apart.

    The disk's own price for one durable commit at that pace (SQLite's WAL commit is this plus
    its bookkeeping); the file is removed afterwards.
    """
    path = directory / "bench-fsync.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"\0" * 65536, 0)
        os.fsync(fd)
        out = []
        for i in range(count):
            t0 = time.perf_counter()
            os.pwrite(fd, b"x" * 4096, (i % 16) * 4096)
            os.fdatasync(fd)
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(gap)
        return out
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def tree(root: int) -> list[int]:
    """`root` and every live descendant of it (from /proc/*/stat's parent pids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """utime + stime of each of `pids` still alive, in seconds."""
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[pid] = cpu_seconds(pid)
    return out


class GroupCpuMeter:
    """CPU seconds used by groups of processes (re-listed at the end: a process started in the
    window counts from its start; one that ended in it is lost) and by the whole machine."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.m0 = machine_cpu()[0]
        self.c0 = {name: cpu_by_pid(list_pids()) for name, list_pids in self.groups.items()}

    def stop(self) -> dict[str, object]:
        wall = time.monotonic() - self.t0
        machine = machine_cpu()[0] - self.m0
        used: dict[str, float] = {}
        counts: dict[str, int] = {}
        for name, list_pids in self.groups.items():
            now = cpu_by_pid(list_pids())
            before = self.c0[name]
            used[name] = sum(v - before.get(pid, 0.0) for pid, v in now.items())
            counts[name] = len(now)
        return {"window_s": wall, "machine_busy_s": machine, "cpu_s": used, "processes": counts}
