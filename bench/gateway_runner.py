"""The real gateway CLI, unchanged, with bench-only instrumentation around it.

`python -m bench.gateway_runner [--tracemalloc DIR] [--switch-interval S] [--profile-client httpx] -- serve --config X`

`serve` starts again on glibc's malloc first, exactly as `gateway serve` does
(`gateway.launch.exec_with_system_malloc`), so a gateway run through here differs from a
plain one only by the options below.

- `--tracemalloc DIR`: run under tracemalloc. On SIGUSR1 a full collection runs and DIR
  receives `snap-K.pickle` (a tracemalloc snapshot), `types-K.json` (live gc-tracked objects
  by type) and finally `done-K`, K = 0, 1, ... (`python -m bench --memory-profile`).
- `--switch-interval S`: `sys.setswitchinterval(S)` before the gateway starts, to test how
  much GIL hand-offs between the event loop and the SQLite threads cost
  (`python -m bench --switch-interval 0.0005`); the default interval is 0.005 s.
- `--profile-client httpx`: the Truecaller profile fetch on httpx instead of the lean
  HTTP/1.1 client: `gateway.app.ProfileClient` is replaced by
  `bench.httpx_profile_client.HttpxProfileClient` before the app is built
  (`python -m bench --profile-client-ab`). `lean` (the default) changes nothing.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType


def _install_snapshots(snap_dir: Path) -> None:
    tracemalloc.start(1)
    taken = 0

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        k = taken
        taken += 1
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        snapshot.dump(str(snap_dir / f"snap-{k}.pickle"))
        counts = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
        (snap_dir / f"types-{k}.json").write_text(json.dumps(dict(counts)))
        (snap_dir / f"done-{k}").touch()

    signal.signal(signal.SIGUSR1, on_usr1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_runner")
    parser.add_argument("--tracemalloc", type=Path, metavar="DIR")
    parser.add_argument("--switch-interval", type=float)
    parser.add_argument("--profile-client", choices=("lean", "httpx"), default="lean")
    parser.add_argument("gateway_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    gateway_args = args.gateway_args
    if gateway_args[:1] == ["--"]:
        gateway_args = gateway_args[1:]
    if argv is None and gateway_args[:1] == ["serve"]:
        from gateway.launch import exec_with_system_malloc

        exec_with_system_malloc()  # returns at once when already done (PYTHONMALLOC is set)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.tracemalloc is not None:
        _install_snapshots(args.tracemalloc)
    if args.profile_client == "httpx":
        import gateway.app
        from bench.httpx_profile_client import HttpxProfileClient

        gateway.app.ProfileClient = HttpxProfileClient  # type: ignore[misc]  # read when the app is built
    from gateway.cli import main as gateway_main

    return gateway_main(gateway_args)


if __name__ == "__main__":
    sys.exit(main())
