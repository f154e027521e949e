"""Reading runs: ``storno list``, ``storno show`` and ``storno stuck``.

They never create or change a database: pointed at one without storno's tables they say so
and exit 1 (see :func:`storno._cli._common.opened`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import click

from storno._cli._common import app_for, db_option, duration, echo_json, opened, summary, ts
from storno._cli._timeline import render_run
from storno._model import RunStatus
from storno._stuck import find_stuck
from storno._views import RunInfo

__all__ = ["COMMANDS"]


@click.command(name="list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in RunStatus]),
    help="Only runs in this status; repeat for several.",
)
@click.option("--saga", help="Only runs of this saga.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Skip this many."
)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@db_option
def list_(
    statuses: tuple[str, ...],
    saga: str | None,
    limit: int,
    offset: int,
    as_json: bool,
    url: str,
) -> None:
    """List runs, newest first; says how many there are when it shows only some."""
    status = list(statuses) or None

    async def fetch() -> tuple[list[RunInfo], int]:
        async with await opened(url) as app:
            runs = await app.list_runs(status=status, saga=saga, limit=limit, offset=offset)
            if offset == 0 and len(runs) < limit:
                return runs, len(runs)  # all of them: no need to count
            return runs, await app.count_runs(status=status, saga=saga)

    runs, total = asyncio.run(fetch())
    shown = offset > 0 or total > len(runs)
    if as_json:
        page = {"total": total, "offset": offset, "limit": limit, "truncated": shown}
        echo_json({"runs": [summary(r) for r in runs], **page})
        return
    rows = [("ID", "SAGA", "STATUS", "CREATED (UTC)", "UPDATED (UTC)")]
    rows += [(r.run_id, r.saga, r.status.value, ts(r.created_at), ts(r.updated_at)) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows if runs else []:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if shown:
        where = f"runs {offset + 1}-{offset + len(runs)}" if runs else f"none after {offset}"
        more = offset + len(runs) < total
        click.echo(
            f"({len(runs)} of {total} shown: {where}, newest first"
            + (f"; --offset {offset + len(runs)} shows the next)" if more else ")")
        )
    elif not runs:
        click.echo("(no runs)")


@click.command(short_help="Show a run's timeline.")
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the run with its history as JSON.")
@db_option
def show(run_id: str, as_json: bool, url: str) -> None:
    """Show a run's timeline: steps, attempts, keys, unknown outcomes, compensations."""

    async def fetch() -> RunInfo:
        async with await opened(url) as app:
            return await app.describe(run_id)

    info = asyncio.run(fetch())
    if as_json:
        echo_json(info.to_json())
    else:
        click.echo("\n".join(render_run(info)))


@click.command(short_help="List runs that made no progress for too long.")
@click.option(
    "--older-than",
    metavar="DURATION",
    callback=duration,
    help="Threshold for every saga (default: each saga's stuck_after, else --default).",
)
@click.option(
    "--default",
    "default",
    metavar="DURATION",
    callback=duration,
    default="1h",
    show_default=True,
    help="Threshold for sagas without stuck_after.",
)
@click.option("--app", "app_ref", metavar="MODULE:ATTR", help="Application (saga thresholds).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.option("--fail-if-any", is_flag=True, help="Exit 3 when a run is stuck (for alarms).")
@db_option
@click.pass_context
def stuck(
    ctx: click.Context,
    older_than: float | None,
    default: float,
    app_ref: str | None,
    limit: int,
    as_json: bool,
    fail_if_any: bool,
    url: str,
) -> None:
    """List runs that have not ended and made no progress for longer than their threshold.
    A waiting or scheduled run whose wake time is still ahead is not stuck."""
    given = None if app_ref is None else app_for(app_ref, url)

    async def fetch() -> list[Any]:
        async with given or await opened(url) as app:
            return await find_stuck(app, older_than=older_than, default=default, limit=limit)

    found = asyncio.run(fetch())
    if as_json:
        echo_json([s.to_json() for s in found])
    elif not found:
        click.echo("(no stuck runs)")
    else:
        for s in found:
            click.echo(
                f"{s.run.run_id}  {s.run.saga}  {s.run.status.value}  "
                f"last change {ts(s.run.updated_at)} UTC\n  {s.reason}"
            )
    if fail_if_any and found:
        ctx.exit(3)


COMMANDS = (list_, show, stuck)
