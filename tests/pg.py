"""A throw-away PostgreSQL for tests: one cluster per xdist worker, a fresh database per test.

`Cluster` runs `initdb` into a temp dir and `pg_ctl start` on a free loopback port with trust
auth, fsync and synchronous commit off (safe for nothing but tests: the data is discarded).
As root the server runs as the `postgres` user (PostgreSQL refuses root). The shared cluster
holds a template database with the migrations applied, so a test's database is one `CREATE
DATABASE … TEMPLATE` away. Without PostgreSQL the tests that need it are skipped, except in CI
(CI=true), where that is a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench.pgcluster import bin_dir  # one answer to "where is PostgreSQL" for the bench and the tests
from tests.utils import free_port

TEMPLATE = "gw_template"


def require_bin_dir() -> Path:
    found = bin_dir()
    if found is None:
        message = "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message + "; CI must run the PostgreSQL tests")
        pytest.skip(message)
    return found


class Cluster:
    """One PostgreSQL server in its own temp dir; `start`, `stop`, `restart`, `destroy`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # In memory where there is /dev/shm: copying a test's database from the template takes
        # 12 ms there, 0.1-0.4 s on a busy disk. Short: the Unix socket's path must fit in 107 bytes.
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.root = Path(tempfile.mkdtemp(prefix="gwpg-", dir=shm))
        self.data = self.root / "data"
        self.port = 0
        self.startup_seconds = 0.0  # initdb, start and the template: what the first test of a worker waits
        self._background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pg-databases")
        self._spare: concurrent.futures.Future[str] | None = None
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C",
                  "--no-sync", "--no-instructions")  # fmt: skip

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        argv = [str(self.bindir / tool), *args]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}\n{tail}")

    def start(self) -> None:
        """Start on the same port as before (a restart), or on a free one the first time."""
        for attempt in range(5):
            port = self.port or free_port()
            options = (
                f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "30",
                          "-o", options, "start")  # fmt: skip
            except RuntimeError:
                if self.port or attempt == 4:  # a restart must keep its port: clients reconnect to it
                    raise
                continue  # another worker took the port in the meantime
            self.port = port
            return

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def restart(self) -> None:
        """Stop (every connection is cut) and start again on the same port."""
        self.stop("fast")
        self.start()

    def destroy(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=True)
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def create_database(self, template: str = TEMPLATE) -> str:
        """A new, empty database (`template0`) or a copy of the migrated template; its DSN.

        The next test's copy is made now, in the background, while this test runs.
        """
        if template == TEMPLATE:
            ready = self._spare or self._background.submit(self._create, TEMPLATE)
            self._spare = self._background.submit(self._create, TEMPLATE)
        else:
            ready = self._background.submit(self._create, template)
        return self.dsn(await asyncio.wrap_future(ready))

    async def drop_database(self, dsn: str) -> None:
        """Drop it in the background: nothing waits for a test's database to go."""
        self._background.submit(self._admin, f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')

    def _create(self, template: str) -> str:
        name = "t_" + secrets.token_hex(6)
        # FILE_COPY: a checkpoint (cheap, with fsync off) and a copy of the files; WAL_LOG,
        # the default, writes every page to the WAL too, several times slower.
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        return name

    def _admin(self, statement: str) -> None:
        """One statement on the `postgres` database, from the background thread (its own event loop)."""

        async def run() -> None:
            conn = await asyncpg.connect(self.dsn(), timeout=10)
            try:
                await conn.execute(statement)
            finally:
                await conn.close()

        asyncio.run(run())


def start_cluster() -> Cluster:
    """A started cluster, with the migrated template database the per-test databases copy."""
    from gateway.storage.postgres import apply_migrations

    started = time.monotonic()
    cluster = Cluster(require_bin_dir())
    try:
        cluster.start()

        def template() -> None:
            cluster._admin(f'CREATE DATABASE "{TEMPLATE}" TEMPLATE template0')
            asyncio.run(apply_migrations(cluster.dsn(TEMPLATE)))

        # On the background thread: this may be called while a test's event loop runs.
        cluster._background.submit(template).result(timeout=60)
    except BaseException:
        cluster.destroy()
        raise
    cluster.startup_seconds = time.monotonic() - started
    return cluster


async def sql_rows(store: Any, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Rows of `sql` (with `?` placeholders) on either store, as dicts: for tests that look inside."""
    from gateway.storage.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        return [dict(r) for r in await store.db.fetchall(sql, params)]
    numbered = iter(range(1, sql.count("?") + 1))
    assert store.pool is not None
    rows: Sequence[Any] = await store.pool.fetch(re.sub(r"\?", lambda _: f"${next(numbered)}", sql), *params)
    return [dict(r) for r in rows]
