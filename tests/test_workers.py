"""`[database] url` and `serve --workers`: config rules that need no PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.cli import main
from gateway.config import settings_from_dict
from gateway.errors import ConfigError
from gateway.workers import worker_argv


def test_a_password_in_the_config_file_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"database": {"url": "postgresql://gw:hunter2-pw@db:5432/gw"}})
    message = str(caught.value)
    assert "database.url" in message and "GATEWAY_DATABASE_URL" in message
    assert "hunter2" not in message and "\n" not in message


def test_the_environment_url_overrides_the_file_and_is_not_in_the_repr() -> None:
    env = {"GATEWAY_DATABASE_URL": "postgresql://gw:s3cret-pw@db:5432/gw"}
    settings = settings_from_dict({"database": {"url": "postgresql://gw@other/gw"}}, env=env)
    assert settings.database.url == env["GATEWAY_DATABASE_URL"]
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize("url", ["mysql://gw:s3cret-pw@db/gw", "gateway.db", "https://db/gw"])
def test_a_url_that_is_not_postgresql_is_one_line_naming_the_key(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({}, env={"GATEWAY_DATABASE_URL": url})
    message = str(caught.value)
    assert "database.url" in message and "s3cret" not in message and "\n" not in message


def test_pool_bounds_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"database\.pool_min"):
        settings_from_dict({"database": {"url": "postgresql://gw@db/gw", "pool_min": 5, "pool_max": 2}})


def test_workers_on_sqlite_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\npath = "{tmp_path / "gateway.db"}"\n')
    assert main(["serve", "--config", str(config), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--workers 2" in err and "SQLite" in err and "[database] url" in err
    assert not (tmp_path / "gateway.db").exists()  # refused before anything was opened


def test_workers_out_of_range_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[database]\nurl = "postgresql://gw@127.0.0.1:1/gw"\n')
    assert main(["serve", "--config", str(config), "--workers", "0"]) == 2
    assert "--workers: expected 1-64" in capsys.readouterr().err


def test_a_worker_runs_the_same_command_on_the_parents_port() -> None:
    argv = ["serve", "--config", "c.toml", "--workers", "2", "--port=0", "--sandbox"]
    assert worker_argv(argv, 8123) == ["serve", "--config", "c.toml", "--sandbox", "--port", "8123", "--reuse-port"]
    assert worker_argv(["serve", "--workers=3", "--port", "80"], 80) == ["serve", "--port", "80", "--reuse-port"]


async def test_migrate_stats_and_webhooks_commands_work_on_postgresql(
    pg_cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway migrate` on an empty PostgreSQL database creates the schema (twice is harmless);
    `gateway stats` and `gateway webhooks list` read it."""
    dsn = await pg_cluster.create_database(template="template0")
    try:
        config = tmp_path / "config.toml"
        config.write_text(f'[database]\nurl = "{dsn}"\n')
        loop = asyncio.get_running_loop()
        for _ in range(2):  # the CLI runs its own event loop: off this test's thread
            assert await loop.run_in_executor(None, main, ["migrate", "--config", str(config)]) == 0
        assert "migrations applied" in capsys.readouterr().out
        conn = await asyncpg.connect(dsn)
        try:
            tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        finally:
            await conn.close()
        assert {"sessions", "session_events", "truecaller_callbacks", "webhook_outbox"} <= tables
        assert await loop.run_in_executor(None, main, ["stats", "--config", str(config)]) == 0
        assert await loop.run_in_executor(None, main, ["webhooks", "list", "--config", str(config)]) == 0
        assert "provider\tstarted" in capsys.readouterr().out
    finally:
        await pg_cluster.drop_database(dsn)
