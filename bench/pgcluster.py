"""A throw-away PostgreSQL server for the benchmark, durable like production.

tests/pg.py's `Cluster` is made for tests (fsync off, data in /dev/shm, imports pytest); the
benchmark compares PostgreSQL with SQLite at `synchronous=FULL`, so both must be durable:
this server keeps `fsync`, `synchronous_commit` and `full_page_writes` on (PostgreSQL's
defaults) and its data directory on disk, under the bench's temporary directory. `initdb` and
`pg_ctl` come from PATH or Debian's /usr/lib/postgresql/<newest>/bin; as root the server runs
as the `postgres` user (PostgreSQL refuses root). `stop()` is safe to call more than once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench import procs
from bench.procs import BenchError

# Every gateway of the bench holds pool_max + 1 (the LISTEN feed) connections; at most three
# gateway processes run at once (the cross-instance pair, or --workers 2 plus its parent's none).
MAX_CONNECTIONS = 100


def bin_dir() -> Path | None:
    """Where initdb and pg_ctl are, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # a symlink on PATH: the real bin dir has psql, createdb too
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else None


class PgServer:
    """initdb into `root`, `start()` on a free loopback port, `createdb`, `stop()`."""

    def __init__(self, root: Path) -> None:
        found = bin_dir()
        if found is None:
            raise BenchError("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin)")
        self.bindir = found
        self.root = root
        self.data = root / "data"
        self.log_path = root / "server.log"
        self.port = 0
        self.as_postgres = os.geteuid() == 0
        root.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            # The server's user must reach its directory through the bench's private temp dir.
            for parent in root.parents:
                if not parent.stat().st_mode & 0o001:
                    os.chmod(parent, parent.stat().st_mode | 0o001)
            shutil.chown(root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C",
                  # the template files need no fsync now: the server's fsync=on covers all it writes later
                  "--no-sync", "--no-instructions")  # fmt: skip

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        argv = [str(self.bindir / tool), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise BenchError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}\n{tail}")
        return done.stdout

    def start(self) -> None:
        for attempt in range(5):
            port = procs.free_port()
            options = (
                f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections={MAX_CONNECTIONS}"
                # production's durability, spelled out: every commit is on disk before it is answered
                " -c fsync=on -c synchronous_commit=on -c full_page_writes=on"
            )
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
                          "-o", options, "start")  # fmt: skip
            except BenchError:
                if attempt == 4:
                    raise
                continue  # the free port was taken in the meantime
            self.port = port
            return

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def createdb(self, name: str) -> str:
        """A new empty database; its DSN (the gateway migrates it when it starts)."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.dsn(name)

    def settings(self) -> dict[str, str]:
        names = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method", "max_connections",
                 "shared_buffers", "server_version")  # fmt: skip
        out = self._run(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-At", "-F", "=", "-c",
            "SELECT name, setting FROM pg_settings WHERE name IN (" + ",".join(f"'{n}'" for n in names) + ")",
        )  # fmt: skip
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        """The postmaster and every process it started (backends, WAL writer, checkpointer, ...)."""
        root = self.postmaster_pid()
        return [] if root is None else procs.tree(root)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", "fast", "stop")
            except (BenchError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "immediate", "stop")
