"""The store for a URL: the one place that knows which backends exist."""

from __future__ import annotations

from storno._store._base import Store
from storno._store._migrations import backend_of

__all__ = ["open_store"]


def open_store(url: str) -> Store:
    """The store for a URL: ``sqlite:///relative.db``, ``sqlite:////abs.db`` or a file path,
    or ``postgresql://user@host/db`` (``postgres://`` too; needs ``storno[postgres]``)."""
    if backend_of(url) == "postgres":
        from storno._store._postgres import PostgresStore

        return PostgresStore(url)
    from storno._store._sqlite import SQLiteStore

    return SQLiteStore(url)
