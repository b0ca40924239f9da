"""What both storage backends share: the shipped migrations, JSON as stored, a sessions row as a `Session`."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any, Protocol

from gateway.errors import StorageError
from gateway.records import Session

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class Row(Protocol):
    """A database row read by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: str) -> Any: ...


def migration_files(*folder: str) -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped in gateway/migrations/<folder>, in order."""
    found: list[tuple[int, str, str]] = []
    root = resources.files("gateway").joinpath("migrations", *folder)
    for entry in root.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise StorageError("two migrations share a version number")
    return found


def dumps(data: object) -> str:
    """JSON as the stores keep it: compact, UTF-8 as is (both backends store the same bytes)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def session_from_row(row: Row) -> Session:
    return Session(
        id=row["id"],
        provider=row["provider"],
        status=row["status"],
        reason=row["reason"],
        provider_ref=row["provider_ref"],
        phone=row["phone"],
        user_ref=row["user_ref"],
        provider_data=json.loads(row["provider_data"]) if row["provider_data"] else {},
        outcome=json.loads(row["outcome"]) if row["outcome"] else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        completed_at=row["completed_at"],
    )
