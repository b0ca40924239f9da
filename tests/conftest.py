"""Shared fixtures: a database path in a temp dir and a running gateway on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.utils import Running, make_settings, run_gateway


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
