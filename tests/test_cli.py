"""The command line, run as a real subprocess."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent), **(env or {})},
    )


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[stream]\nheartbeat = 400\n", "stream.heartbeat"),
        ('[server]\ncors_allow_origins = ["*"]\n', "server.cors_allow_origins"),
        ('[server]\nport = "x"\n', "server.port"),
        ('[databse]\npath = "x.db"\n', "databse"),
    ],
)
def test_bad_config_exits_before_binding_with_one_line(tmp_path: Path, toml: str, key: str) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml + f'\n[database]\npath = "{tmp_path}/g.db"\n' if "databse" not in toml else toml)
    result = run("serve", "--config", str(cfg), "--port", str(port), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and key in lines[0]
    assert not (tmp_path / "g.db").exists()  # nothing was started


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    result = run("serve", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert result.returncode == 2 and "not found" in result.stderr


def test_env_var_names_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[sessions]\nttl = 0\n")
    result = run("migrate", cwd=tmp_path, env={"GATEWAY_CONFIG": str(cfg)})
    assert result.returncode == 2 and "sessions.ttl" in result.stderr


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(f'[database]\npath = "{tmp_path}/m.db"\n')
    first = run("migrate", cwd=tmp_path)
    assert first.returncode == 0 and "0001_sessions.sql" in first.stdout
    second = run("migrate", cwd=tmp_path)
    assert second.returncode == 0 and "none pending" in second.stdout
    with sqlite3.connect(tmp_path / "m.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] >= 1


def test_serve_starts_again_on_glibc_malloc_unless_the_operator_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import launch

    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(launch.os, "execve", lambda path, args, env: calls.append((path, list(args), dict(env))))
    monkeypatch.setattr(launch.sys, "orig_argv", ["python3", "-X", "dev", "-m", "gateway", "serve", "--port", "1"])
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    launch.exec_with_system_malloc()
    assert len(calls) == 1
    path, args, env = calls[0]
    assert path == sys.executable and args == [sys.executable, "-X", "dev", "-m", "gateway", "serve", "--port", "1"]
    assert env["PYTHONMALLOC"] == "malloc" and env["PATH"] == launch.os.environ["PATH"]
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc")
    launch.exec_with_system_malloc()
    assert len(calls) == 1  # left alone
