"""The benchmark's Truecaller profile host: `python -m bench.fake_profile --port P`.

Wraps `gateway.providers.truecaller.fake.create_fake_truecaller()` (left untouched): a token of the
shape `bench-<digits>` needs no registration and reads the profile of the number `+<digits>`
(so a session created with that phone is `verified`); every other request goes to the fake
itself (unknown tokens get its documented 401). Benchmark tokens skip the fake's request log,
which would otherwise grow by one record per verification.

Also answers `GET /readyz` (readiness) and `GET /bench/stats` (how many profiles were served,
and how many of them to httpx, told by its `User-Agent`: the profile-client A/B checks with it
which client the gateway really used).
"""

from __future__ import annotations

import argparse
import json
import re

import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.providers.truecaller.fake import PROFILE_PATH, FakeUser, create_fake_truecaller

BENCH_TOKEN = re.compile(r"bench-([1-9][0-9]{7,14})")
_JSON = [(b"content-type", b"application/json")]


def bench_token(digits: str) -> str:
    """The access token whose profile has the phone number `+<digits>`."""
    return f"bench-{digits}"


def create_bench_fake() -> tuple[object, object]:
    """(ASGI app, the fake's state)."""
    fake_app, state = create_fake_truecaller()
    served = served_httpx = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal served, served_httpx
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            if path == PROFILE_PATH:
                auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
                scheme, _, token = auth.partition(" ")
                match = BENCH_TOKEN.fullmatch(token) if scheme == "Bearer" else None
                if match:
                    user = FakeUser("+" + match.group(1), "Bench", "User", "bench@example.in", "IN", odd_types=True)
                    served += 1
                    agent = next((v for k, v in scope["headers"] if k == b"user-agent"), b"")
                    if agent.startswith(b"python-httpx/"):
                        served_httpx += 1
                    await _json(send, 200, state.profile(user))
                    return
            elif path == "/readyz":
                await _json(send, 200, {"status": "ready"})
                return
            elif path == "/bench/stats":
                await _json(send, 200, {"served": served, "served_httpx": served_httpx, "fake_served": state.served})
                return
        await fake_app(scope, receive, send)

    return app, state


async def _json(send: Send, status: int, payload: object) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [*_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_profile")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app, _ = create_bench_fake()
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        ws="none",
    )
    uvicorn.Server(config).run()  # loop="auto": uvloop when installed, so the fake is never the bottleneck


if __name__ == "__main__":
    main()
