"""Shared fixtures: a database path in a temp dir, a running gateway on a free port, and a Store
of each backend (SQLite in a temp file, PostgreSQL in a fresh database of a per-worker cluster)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.storage.base import Store
from tests.pg import Cluster, require_bin_dir, start_cluster
from tests.utils import Running, make_settings, run_gateway

# The modules that take longest (seconds, with two workers on 2 cores), longest first.
# `-n auto` hands whole modules to the workers (--dist loadfile, see pyproject.toml) in
# collection order; these go first so that none of them starts last and leaves the other
# workers idle while it runs. A module missing here only runs later, in file order.
LONGEST_FIRST = (
    "test_scaleout.py",  # ~27 s: gateway processes killed and restarted, PostgreSQL restarted
    "test_browser.py",  # ~21 s
    "test_zipapp.py",  # ~20 s: building the artifact
    "test_bench_scaleout_smoke.py",  # ~20 s
    "test_webhooks_delivery.py",  # ~14 s
    "test_abuse.py",  # ~10 s
    "test_bench_smoke.py",  # ~10 s
    "test_api.py",
    "test_stream.py",
    "test_doctor.py",
    "test_disk.py",
    "test_reconnect_spread.py",
    "test_browser_resume.py",
    "test_idempotency.py",
    "test_truecaller_flow.py",
    "test_sandbox_scripted.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto`: one worker more than there are cores. The end-to-end tests spend most of their
    time waiting on sockets, timers and subprocesses (one worker per core left the cores idle
    half the time); a third worker on 2 cores takes the suite from ~103 s to ~85-90 s."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own answer: the variable says how many
    return len(os.sched_getaffinity(0)) + 1


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
async def gw(db_path: Path) -> AsyncIterator[Running]:
    """A real gateway on a free port, with a small heartbeat and the default providers."""
    settings = make_settings(
        db_path, {"stream": {"heartbeat": 0.2}, "server": {"cors_allow_origins": ["https://shop.example"]}}
    )
    async with run_gateway(settings) as running:
        yield running


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """This worker's PostgreSQL (started on first use, about a second); never stopped by a test."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
async def pg_dsn(pg_cluster: Cluster) -> AsyncIterator[str]:
    """A fresh database with the migrations applied (a copy of the cluster's template)."""
    dsn = await pg_cluster.create_database()
    try:
        yield dsn
    finally:
        await pg_cluster.drop_database(dsn)


@pytest.fixture
def own_pg_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own, for a test that stops or restarts the server."""
    cluster = Cluster(require_bin_dir())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Cluster | None:
    """Which Store the test runs on: None for SQLite, else the PostgreSQL cluster."""
    if request.param == "postgresql":
        cluster: Cluster = request.getfixturevalue("pg_cluster")
        return cluster
    return None


@pytest.fixture
async def store(backend: Cluster | None, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened Store of each backend: the same test runs against SQLite and PostgreSQL."""
    from gateway.storage.postgres import PgStore
    from gateway.storage.sqlite import SqliteStore

    opened: Store
    dsn = None
    if backend is None:
        opened = SqliteStore(str(tmp_path / "store.db"))
    else:
        dsn = await backend.create_database()
        opened = PgStore(dsn, min_size=1, max_size=10)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
        if backend is not None and dsn is not None:
            await backend.drop_database(dsn)
