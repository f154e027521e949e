"""``storno db``: bring a database's schema up to date, or show where it stands.

Stores migrate themselves when they open, so ``storno db upgrade`` is only needed to migrate
ahead of a deploy (or with a role that may change the schema, while workers run with one that
may not). Both commands work on SQLite files and PostgreSQL schemas alike.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import click

from storno._cli._common import url_option
from storno._store._factory import schema_status as status
from storno._store._factory import upgrade
from storno._store._migrations import SchemaStatus

__all__ = ["db"]

_db_option = url_option(
    "Database holding the runs, e.g. sqlite:///storno.db or postgresql://host/db."
)


def _when(ts: float | None) -> str:
    if ts is None:
        return "?"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(info: SchemaStatus) -> list[str]:
    lines = [f"database  {info.url} ({info.backend})"]
    if not info.exists:
        lines.append(f"schema    none yet; `storno db upgrade` creates version {info.latest}")
    elif info.too_new:
        lines.append(
            f"schema    version {info.current}, newer than this storno knows ({info.latest}); "
            f"upgrade storno"
        )
    elif info.up_to_date:
        lines.append(f"schema    version {info.current}, up to date")
    else:
        lines.append(f"schema    version {info.current} of {info.latest}")
    for version, at in info.applied:
        lines.append(f"  applied {version:04d}  {_when(at)}")
    for name in info.pending:
        lines.append(f"  pending {name}")
    return lines


@click.group(name="db", short_help="Migrate the database schema, or show its version.")
def db() -> None:
    """The database schema: `storno db status` shows its version and the migrations not
    applied yet; `storno db upgrade` applies them. Workers also migrate when they start."""


@db.command(name="status", short_help="Show the schema version and pending migrations.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_db_option
def status_(as_json: bool, url: str) -> None:
    """Show the database's schema version and the migrations it lacks; changes nothing."""
    info = asyncio.run(status(url))
    if as_json:
        click.echo(json.dumps(info.to_json(), indent=2))
    else:
        click.echo("\n".join(_describe(info)))


@db.command(name="upgrade", short_help="Apply the migrations the database lacks.")
@click.option("--json", "as_json", is_flag=True, help="Print the status before and after.")
@_db_option
def upgrade_(as_json: bool, url: str) -> None:
    """Apply the migrations the database lacks (creating it if needed), under a lock so that
    workers starting at the same time cannot apply one twice."""
    before, after = asyncio.run(upgrade(url))
    if as_json:
        click.echo(json.dumps({"before": before.to_json(), "after": after.to_json()}, indent=2))
        return
    applied = [name for name in before.pending if name not in after.pending]
    if applied:
        click.echo(
            f"{after.url}: schema version {before.current} -> {after.current} "
            f"(applied {', '.join(applied)})"
        )
    else:
        click.echo(f"{after.url}: schema version {after.current}, already up to date")
