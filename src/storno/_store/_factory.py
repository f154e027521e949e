"""The store for a URL: the one place that knows which backends exist."""

from __future__ import annotations

import asyncio

from storno._store._base import Store
from storno._store._migrations import SchemaStatus, backend_of, too_new

__all__ = ["open_store", "schema_status", "upgrade"]


def open_store(url: str) -> Store:
    """The store for a URL: ``sqlite:///relative.db``, ``sqlite:////abs.db`` or a file path,
    or ``postgresql://user@host/db`` (``postgres://`` too; needs ``storno[postgres]``)."""
    if backend_of(url) == "postgres":
        from storno._store._postgres import PostgresStore

        return PostgresStore(url)
    from storno._store._sqlite import SQLiteStore

    return SQLiteStore(url)


async def schema_status(url: str) -> SchemaStatus:
    """The schema version of the database at ``url``; changes nothing."""
    return await open_store(url).schema_status()


async def upgrade(url: str) -> tuple[SchemaStatus, SchemaStatus]:
    """Apply the missing migrations; return the status before and after."""
    before = await schema_status(url)
    if before.too_new:
        raise too_new(before.current, before.latest)
    if backend_of(url) == "postgres":
        from storno._store._postgres import PostgresStore

        await PostgresStore(url).migrate()
    else:
        from storno._store._sqlite_connection import upgrade_file

        await asyncio.to_thread(upgrade_file, url)
    return before, await schema_status(url)
