"""A site backend for the webhooks A/B: answers each POST with 200 after a delay, counts them.

`python -m bench.webhook_receiver --port P [--delay-ms 20]`; `GET /stats` → {"received", "distinct"}
(distinct webhook-ids: with a healthy receiver every event arrives once); `GET /readyz` → 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvicorn
from starlette.types import Receive, Scope, Send


def create_receiver(delay: float) -> object:
    ids: set[bytes] = set()
    received = 0

    async def reply(send: Send, status: int, body: bytes = b"") -> None:
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal received
        if scope["type"] != "http":
            return
        if scope["method"] == "POST":
            while (await receive()).get("more_body"):
                pass
            received += 1
            ids.update(v for k, v in scope["headers"] if k == b"webhook-id")
            if delay:
                await asyncio.sleep(delay)  # a slow receiver, on purpose
            await reply(send, 200)
        elif scope["path"] == "/stats":
            await reply(send, 200, json.dumps({"received": received, "distinct": len(ids)}).encode())
        else:
            await reply(send, 200)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.webhook_receiver")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    app = create_receiver(args.delay_ms / 1000)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="off")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
