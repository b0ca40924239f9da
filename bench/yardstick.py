"""The yardstick: a trivial Starlette JSON endpoint served like the gateway serves its app.

`python -m bench.yardstick --port P [--loop asyncio|uvloop]`

The uvicorn settings mirror `gateway.cli.build_server` (access log off, lifespan on, no
server header, no proxy headers, no WebSockets, http="auto" → httptools). `--loop asyncio`
runs `asyncio.run(server.serve())` exactly as `gateway.cli.main` does (which skips uvicorn's
loop factory, so no uvloop); `--loop uvloop` runs it on uvloop. The benchmark picks the loop
it finds in the running gateway, so the comparison stays like for like.
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

PATH = "/json"


async def hello(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    return JSONResponse({"status": "ready"})


def create_app() -> Starlette:
    return Starlette(routes=[Route(PATH, hello, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.yardstick")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args(argv)
    config = uvicorn.Config(
        create_app(),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        server_header=False,
        proxy_headers=False,
        ws="none",
        loop=args.loop,
    )
    server = uvicorn.Server(config)
    if args.loop == "asyncio":
        asyncio.run(server.serve())
    else:
        server.run()


if __name__ == "__main__":
    main()
