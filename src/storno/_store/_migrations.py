"""Versioned schema migrations, shared by the backends: which exist, which a database has.

Each backend keeps numbered SQL files in ``migrations/<backend>/NNNN_name.sql``; a database
records the versions it has in ``storno_schema``. Stores apply what is missing when they open
(SQLite under its write lock, PostgreSQL under an advisory lock), so several workers starting
at once migrate once. ``schema/<backend>.sql`` is the whole current definition in one file;
a test checks that migrating an empty database gives exactly that.

``storno db upgrade`` and ``storno db status`` use ``upgrade`` and ``schema_status`` of
:mod:`storno._store._factory`, which picks the backend; this module knows none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from storno._errors import ConfigurationError, StoreError

__all__ = [
    "Backend",
    "Migration",
    "SchemaStatus",
    "available",
    "backend_of",
    "current_schema",
    "redact",
    "status_of",
    "too_new",
]

Backend = Literal["sqlite", "postgres"]


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered migration file."""

    version: int
    name: str  # the file name without .sql, e.g. 0002_waits_inbox
    sql: str


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database's schema stands against the migrations this storno knows."""

    backend: Backend
    url: str  # with any password masked
    exists: bool  # False: nothing created yet (no file, no storno tables)
    current: int  # highest version applied, 0 for none
    latest: int  # highest version this storno knows
    applied: list[tuple[int, float | None]] = field(default_factory=list)  # (version, unix time)
    pending: list[str] = field(default_factory=list)  # names of migrations not applied yet

    @property
    def up_to_date(self) -> bool:
        return self.exists and self.current == self.latest

    @property
    def too_new(self) -> bool:
        """The database was migrated by a newer storno than this one."""
        return self.current > self.latest

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "url": self.url,
            "exists": self.exists,
            "current": self.current,
            "latest": self.latest,
            "up_to_date": self.up_to_date,
            "too_new": self.too_new,
            "applied": [{"version": v, "applied_at": at} for v, at in self.applied],
            "pending": list(self.pending),
        }


def available(backend: Backend) -> list[Migration]:
    """The migrations shipped for a backend, in order."""
    folder = resources.files("storno._store").joinpath("migrations", backend)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append(Migration(version, entry.name[: -len(".sql")], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StoreError(f"two {backend} migrations share a version number: {versions}")
    return found


def status_of(backend: Backend, url: str, applied: list[tuple[int, float | None]]) -> SchemaStatus:
    """The status of a database that has the ``applied`` (version, unix time) migrations."""
    known = available(backend)
    latest = known[-1].version if known else 0
    current = max((v for v, _ in applied), default=0)
    pending = [m.name for m in known if m.version > current]
    return SchemaStatus(backend, redact(url), bool(applied), current, latest, applied, pending)


def too_new(current: int, latest: int) -> StoreError:
    """The error for a database migrated past the newest version this storno knows."""
    return StoreError(
        f"the database is at schema version {current}, newer than this storno "
        f"understands ({latest}); upgrade storno"
    )


def current_schema(backend: Backend) -> str:
    """The whole current schema definition for a backend, as one SQL text."""
    return resources.files("storno._store").joinpath("schema", f"{backend}.sql").read_text()


def backend_of(url: str) -> Backend:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgres"
    if "://" in url and not url.startswith("sqlite://"):
        scheme = url.split("://", 1)[0]
        raise ConfigurationError(
            f"unsupported database URL scheme {scheme!r} in {redact(url)!r}; use "
            f"sqlite:///path.db or postgresql://user@host/db"
        )
    return "sqlite"


_SECRET_OPTION = re.compile(r"(?i)((?:^|[?&;\s])[a-z_]*password\s*=\s*)([^&;\s#]*)")


def redact(url: str) -> str:
    """The URL with every password in it (``user:password@``, ``?password=``,
    ``sslpassword=``) replaced by ``***``: the one way storno shows a database URL."""
    scheme, sep, rest = url.partition("://")
    if sep and not rest.startswith("/"):
        # The user info ends at the last "@" before the query: a password typed without
        # percent-escapes may hold "@" or "/" itself.
        query = min((i for i in (rest.find(c) for c in "?#") if i >= 0), default=len(rest))
        userinfo, at, after = rest[:query].rpartition("@")
        if at and ":" in userinfo:
            url = f"{scheme}://{userinfo.split(':', 1)[0]}:***@{after}{rest[query:]}"
    return _SECRET_OPTION.sub(lambda m: f"{m.group(1)}***" if m.group(2) else m.group(0), url)
