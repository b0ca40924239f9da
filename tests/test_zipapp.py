"""The one-file artifact: scripts/build-zipapp builds gateway.pyz, which serves and stops cleanly.

The build installs shiv and every dependency from PyPI (about 20-30 s), once per session.
Without network access to PyPI it is skipped, except in CI (CI=true), where it must run.
Locally: `pytest --ignore tests/test_zipapp.py` leaves it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.utils import free_port, to_toml, wait_ready

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
# The interpreter behind the venv, not the venv's: on a plain Python (here, with none of the
# gateway's dependencies installed) the gateway can only run from what the artifact holds.
BASE_PYTHON = Path(getattr(sys, "_base_executable", sys.executable))
SHIV_UNAVAILABLE = 3  # build-zipapp's exit status when shiv cannot be installed


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "gateway.pyz"
    env = {**os.environ, "PYTHON": str(BASE_PYTHON)}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-zipapp"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    if done.returncode == SHIV_UNAVAILABLE and os.environ.get("CI", "").lower() not in ("1", "true"):
        pytest.skip(f"shiv cannot be installed here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def check_contents(pyz: Path) -> None:
    """The package data is inside and the file runs as a program."""
    with zipfile.ZipFile(pyz) as archive:
        names = set(archive.namelist())
    prefix = "site-packages/gateway/migrations/"
    packaged = {n.removeprefix(prefix) for n in names if n.startswith(prefix) and not n.endswith("/")}
    shipped = {p.relative_to(ROOT / "migrations").as_posix() for p in (ROOT / "migrations").rglob("*.sql")}
    assert packaged == shipped and any(name.startswith("postgresql/") for name in shipped)
    static = {n.rsplit("/", 1)[1] for n in names if n.startswith("site-packages/gateway/static/")}
    assert static == {p.name for p in (ROOT / "gateway" / "static").iterdir() if p.is_file()}
    assert "site-packages/gateway/cli.py" in names
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(pyz, os.X_OK)


async def test_artifact_holds_its_data_serves_creates_a_session_and_exits_zero_on_sigterm(
    pyz: Path, tmp_path: Path
) -> None:
    # One test, not two: two tests could land on two xdist workers and build the artifact twice.
    check_contents(pyz)
    # A fresh "machine": the file, a config, an empty directory; python3 on PATH is the base interpreter.
    shutil.copy2(pyz, tmp_path / "gateway.pyz")
    port = free_port()
    config = {
        "server": {"port": port},
        "database": {"path": "data/gateway.db"},
        "logging": {"format": "json"},
        "providers": {"veriphone": {"enabled": False}},
    }
    (tmp_path / "config.toml").write_text(to_toml(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {
        "PATH": f"{BASE_PYTHON.parent}{os.pathsep}{env.get('PATH', '')}",
        "SHIV_ROOT": str(tmp_path / "shiv"),
        "HOME": str(tmp_path),
    }
    with (tmp_path / "gateway.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            "./gateway.pyz",
            "serve",
            "--config",
            "config.toml",
            cwd=tmp_path,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc, timeout=60)  # the first start unpacks the archive
        # `serve` started itself again (same pid) on glibc's malloc: memory goes back after streams close
        assert b"PYTHONMALLOC=malloc" in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            created = await client.post("/v1/sessions", json={"provider": "truecaller"})
            assert created.status_code == 201, created.text
            read = await client.get(created.json()["status_url"])
            assert read.json()["status"] == "pending"
            static = await client.get("/static/verify.js")
            assert static.status_code == 200
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = (tmp_path / "gateway.log").read_text()
    assert code == 0, output
    assert "Traceback" not in output, output
    assert (tmp_path / "shiv").is_dir()  # unpacked where SHIV_ROOT said, not in ~/.shiv
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "gateway.db")) as db:
        assert db.execute("SELECT id FROM sessions").fetchall() == [(created.json()["id"],)]
