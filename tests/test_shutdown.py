"""SIGTERM on a real `python -m gateway serve` process: streams end cleanly, nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.providers.truecaller.fake import PROFILE_PATH, create_fake_truecaller, post_callback, post_status
from tests.utils import RawStream, free_port, serve_app, to_toml, wait_ready

pytestmark = pytest.mark.timeout(40)

SHUTDOWN_TIMEOUT = 3.0
PHONE = "+919812345670"
CALLBACK = "/v1/callbacks/truecaller"


@contextlib.asynccontextmanager
async def gateway_process(
    tmp_path: Path, config: dict[str, Any], extra_env: dict[str, str] | None = None, port: int | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m gateway serve` on a free port; killed if the test did not stop it."""
    port = port or free_port()
    config_path = tmp_path / "config.toml"
    config_path.write_text(to_toml({**config, "server": {**config.get("server", {}), "port": port}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | (extra_env or {})
    with (tmp_path / "gateway.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config_path),
            cwd=tmp_path,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigterm_closes_streams_finishes_callback_work_and_exits_zero(tmp_path: Path) -> None:
    app, fake = create_fake_truecaller()
    fake.delay = 1.0  # the profile fetch is still running when SIGTERM arrives
    async with serve_app(app) as fake_url:
        config = {
            "server": {"shutdown_timeout": SHUTDOWN_TIMEOUT},
            "database": {"path": str(tmp_path / "gateway.db")},
            "logging": {"format": "json"},
            "providers": {
                "truecaller": {
                    "require_https": False,
                    "require_public_ip": False,
                    "profile_hosts": [fake_url.removeprefix("http://")],
                },
                "veriphone": {"enabled": False},
            },
        }
        async with (
            gateway_process(tmp_path, config) as (proc, url),
            httpx.AsyncClient(base_url=url, timeout=5) as client,
        ):

            async def create() -> tuple[str, str]:
                r = await client.post("/v1/sessions", json={"provider": "truecaller", "phone": PHONE})
                assert r.status_code == 201, r.text
                return r.json()["id"], r.json()["truecaller"]["request_nonce"]

            # Written before SIGTERM: a session and its outcome, all over HTTP.
            rejected, nonce = await create()
            assert (await post_status(client, CALLBACK, nonce, "user_rejected")).json() == {"status": "accepted"}
            # An acknowledged token callback whose profile fetch is still in flight.
            fetching, nonce = await create()
            token = fake.issue_token(PHONE, "Asha", "Rao", "asha@example.in", "IN")
            answer = await post_callback(client, CALLBACK, nonce, token, fake_url + PROFILE_PATH)
            assert answer.json() == {"status": "accepted"}

            pending = [(await create())[0] for _ in range(3)]
            streams: list[tuple[httpx.Response, RawStream]] = []
            async with contextlib.AsyncExitStack() as stack:
                for sid in [*pending, fetching]:
                    response = await stack.enter_async_context(client.stream("GET", f"/v1/sessions/{sid}/events"))
                    stream = RawStream(response)
                    await stream.until(b"event: status")
                    streams.append((response, stream))

                proc.send_signal(signal.SIGTERM)
                started = time.monotonic()
                # Each stream ends with a proper end of body (httpx raises on a reset or a cut chunk).
                rests = await asyncio.gather(*(stream.rest(timeout=SHUTDOWN_TIMEOUT + 2) for _, stream in streams))
                assert all(stream.ended for _, stream in streams)
                # The pending sessions get no outcome; the one whose fetch ends during the stop
                # may get its outcome first, if its stream's close (spread over the stop) is later.
                assert all(b"event: outcome" not in rest for rest in rests[:-1])
                code = await asyncio.wait_for(proc.wait(), SHUTDOWN_TIMEOUT + 5)
                elapsed = time.monotonic() - started

    output = (tmp_path / "gateway.log").read_text()
    assert code == 0, output
    assert elapsed < SHUTDOWN_TIMEOUT + 3, elapsed
    assert "Traceback" not in output and "did not finish in time" not in output, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "Application shutdown complete." for entry in lines)

    with contextlib.closing(sqlite3.connect(tmp_path / "gateway.db")) as db:
        status = dict(db.execute("SELECT id, status || '/' || COALESCE(reason, '') FROM sessions").fetchall())
        outcomes = dict(db.execute("SELECT session_id, data FROM session_events WHERE kind = 'outcome'").fetchall())
        leftover = db.execute("SELECT COUNT(*) FROM truecaller_callbacks").fetchone()[0]
    assert status[rejected] == "rejected/user_rejected"
    assert json.loads(outcomes[rejected])["status"] == "rejected"
    # The fetch the callback started finished during the shutdown and its outcome is stored.
    assert status[fetching] == "verified/"
    assert json.loads(outcomes[fetching])["profile"]["email"] == "asha@example.in"
    assert leftover == 0
    assert [status[sid] for sid in pending] == ["pending/"] * 3
