"""The command-line entry point (`gateway`, `python -m gateway`, the zipapp): light on imports.

`gateway serve` first starts itself again on glibc's malloc (see `exec_with_system_malloc`),
before anything heavy is imported, so the second start is the only one that costs.
"""

from __future__ import annotations

import os
import sys


def exec_with_system_malloc() -> None:
    """Start again on glibc's malloc instead of Python's small-object allocator.

    Ten thousand streams come and go as millions of small objects. pymalloc keeps them in
    1 MiB arenas that go back to the OS only when completely empty, and a few survivors pin
    most of them: after 10,000 streams closed the gateway stayed 26-38 MiB above where it
    started. With glibc's malloc the memory releaser's `malloc_trim` returns every free
    page and the process ends 6-10 MiB above (docs/BENCHMARKS.md), for ~0.6 KiB more per
    open stream and a few percent of throughput. A `PYTHONMALLOC` the operator set (even to
    `pymalloc`) is left alone; so is a process that cannot be started again the same way.
    """
    if "PYTHONMALLOC" in os.environ or not sys.executable:
        return
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # noqa: S606 - ourselves again
    except OSError:  # pragma: no cover - e.g. the interpreter is gone: run as we are
        return


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        exec_with_system_malloc()
    from gateway.cli import main as cli_main

    return cli_main()
