"""Events from the command line: ``storno outbox`` (how the outbox stands, its rows, retrying
or discarding its dead letters) and ``storno correlation`` (the runs of one choreography).

They read and change the database only, like the operator commands: no broker is needed, and
a relay that shares the database sends a retried event at its next claim.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import click

from storno._cli._common import actor_option, db_option, echo_json, opened, ts
from storno._cli._timeline import cause_text, emitted_text
from storno._correlation import Correlation, Entry, load_correlation
from storno._outbox_ops import STATUSES, Action, OutboxAction, act, refusal, row_json, stats_json

if TYPE_CHECKING:
    from storno._store._outbox import OutboxRow, OutboxStats

__all__ = ["COMMANDS"]


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


@click.group(name="outbox", short_help="The outbox: its state, its rows, its dead letters.")
def outbox() -> None:
    """The transactional outbox: `status` (what waits, what is dead, the lag), `list` (its
    rows), and `retry` / `discard` for dead letters (events the broker kept refusing, which
    block their key)."""


@outbox.command(name="status", short_help="Pending and dead events, and the lag.")
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@db_option
def status_(as_json: bool, url: str) -> None:
    """How the outbox stands: events not sent yet, dead letters, and how long the oldest
    unsent event has waited (the lag, in seconds)."""

    async def fetch() -> OutboxStats:
        async with await opened(url) as app:
            return await app.store.outbox.stats()

    stats, now = asyncio.run(fetch()), time.time()
    if as_json:
        echo_json(stats_json(stats, now))
        return
    oldest = stats.oldest_pending_at
    since = "" if oldest is None else f" (oldest unsent since {ts(oldest)} UTC)"
    click.echo(f"pending  {stats.pending}")
    click.echo(f"dead     {stats.dead}")
    click.echo(f"lag      {stats.lag(now):.1f}s{since}")


@outbox.command(name="list", short_help="List outbox rows, newest first.")
@click.option("--status", type=click.Choice(STATUSES), help="Only rows in this status.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Skip this many."
)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@db_option
def list_(status: str | None, limit: int, offset: int, as_json: bool, url: str) -> None:
    """List the outbox's rows, newest first: event id, topic, key, status, attempts, when it
    was committed, and who emitted it; a dead letter with the broker's last refusal. Says how
    many there are when it shows only some."""

    async def fetch() -> tuple[list[OutboxRow], int]:
        async with await opened(url) as app:
            rows = await app.store.outbox.rows(status=status, limit=limit, offset=offset)
            if offset == 0 and len(rows) < limit:
                return rows, len(rows)
            return rows, await app.store.outbox.count(status=status)

    rows, total = asyncio.run(fetch())
    shown = offset > 0 or total > len(rows)
    if as_json:
        page = {"total": total, "offset": offset, "limit": limit, "truncated": shown}
        echo_json({"rows": [row_json(r) for r in rows], **page})
        return
    table = [("EVENT", "TOPIC", "KEY", "STATUS", "TRIES", "CREATED (UTC)", "SOURCE")]
    for r in rows:
        m = r.message
        cells = (m.event_id, m.topic, m.key or "-", r.status, str(r.attempts))
        table.append((*cells, ts(r.created_at), m.source or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table if rows else []):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        error = rows[n - 1].last_error if n else None
        if error and rows[n - 1].status in ("dead", "pending"):
            click.echo(f"  {_short(error, 110)}")
    if shown:
        where = f"rows {offset + 1}-{offset + len(rows)}" if rows else f"none after {offset}"
        more = offset + len(rows) < total
        click.echo(
            f"({len(rows)} of {total} shown: {where}, newest first"
            + (f"; --offset {offset + len(rows)} shows the next)" if more else ")")
        )
    elif not rows:
        click.echo("(no outbox rows)" if status is None else f"(no {status} rows)")


def _act(url: str, action: Action, event_ids: tuple[str, ...], by: str, as_json: bool) -> None:
    async def go() -> OutboxAction:
        async with await opened(url) as app:
            return await act(app.store.outbox, action, event_ids, by=by, now=app.clock.now())

    done = asyncio.run(go())
    if as_json:
        echo_json(
            {
                "action": done.action,
                "by": by,
                "changed": [r.message.event_id for r in done.changed],
                "refused": done.refused,
            }
        )
    else:
        for row in done.changed:
            m = row.message
            key = f", key {m.key}" if m.key is not None else ""
            click.echo(f"{done.done}: event {m.event_id} ({m.topic}{key}) by {by}")
    if done.refused:
        raise click.ClickException(refusal(done.refused))


@outbox.command(name="retry", short_help="Send dead letters again, with a fresh budget.")
@click.argument("event_ids", nargs=-1, required=True, metavar="EVENT_ID...")
@actor_option("Who retries them; logged (outbox rows keep no history) and printed.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@db_option
def retry(event_ids: tuple[str, ...], by: str, as_json: bool, url: str) -> None:
    """Make dead letters pending again with a fresh attempt budget (once the broker takes
    them: fixed limits, a topic that exists). Ids that are not dead letters are named and
    left as they are (exit 1)."""
    _act(url, "retry", event_ids, by, as_json)


@outbox.command(name="discard", short_help="Give dead letters up, unblocking their keys.")
@click.argument("event_ids", nargs=-1, required=True, metavar="EVENT_ID...")
@click.option(
    "--by",
    required=True,
    help="Who gives them up; logged (outbox rows keep no history) and printed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@db_option
def discard(event_ids: tuple[str, ...], by: str, as_json: bool, url: str) -> None:
    """Give dead letters up: they are never sent, and the later events of their keys go out.
    Ids that are not dead letters are named and left as they are (exit 1)."""
    _act(url, "discard", event_ids, by, as_json)


# --- correlation -------------------------------------------------------------------------


def _entry_text(e: Entry) -> str:
    if e.kind == "started":
        if e.cause is not None:
            return f"started by {cause_text(e.cause)}"
        return f"started as a child of run {e.parent_run_id}" if e.parent_run_id else "started"
    if e.kind == "emitted":
        assert e.emitted is not None
        took = f"; taken by run {', '.join(e.consumed_by)}" if e.consumed_by else ""
        return f"#{e.emitted.position} {emitted_text(e.emitted)}{took}"
    if e.kind == "signalled":
        assert e.cause is not None
        return f"signal {e.signal!r} from {cause_text(e.cause)}"
    return f"ended {e.status}"


def render_correlation(c: Correlation) -> list[str]:
    """The runs of a correlation, oldest first, each with what started it and what it emitted
    and received; then the correlation's timeline across them."""
    count = f"{len(c.runs)} run{'' if len(c.runs) == 1 else 's'}"
    lines = [
        f"correlation {c.correlation_id}: {count}" + (" (more not shown)" if c.truncated else "")
    ]
    for run in c.runs:
        info = run.info
        lines += ["", f"run {info.run_id}  saga {info.saga}  status {info.status.value}"]
        lines.append(f"  created {ts(info.created_at)} UTC")
        if run.cause is not None:
            by = f", handler {run.cause.consumer}" if run.cause.consumer else ""
            lines.append(f"  started by {cause_text(run.cause)}{by}")
        elif info.parent_run_id:
            lines.append(f"  child of run {info.parent_run_id}")
        for em in run.emitted:
            lines.append(f"  #{em.position} {emitted_text(em)}")
        for s in run.signals:
            lines.append(f"  received signal {s.name!r} from {cause_text(s.cause)}")
    lines += ["", "timeline (UTC)"]
    width = max(len(e.run_id) for e in c.entries)
    for e in c.entries:
        lines.append(f"  {ts(e.at)}  {e.run_id:<{width}}  {_entry_text(e)}")
    return lines


@click.command(short_help="Show the runs of one correlation id.")
@click.argument("correlation_id", metavar="CORRELATION_ID")
@click.option("--json", "as_json", is_flag=True, help="Print the correlation as JSON.")
@db_option
def correlation(correlation_id: str, as_json: bool, url: str) -> None:
    """Show the runs that share CORRELATION_ID (a choreography), oldest first: saga, status,
    the event that started each and where it came from, the events each emitted and the
    signals events sent it; then one timeline across them."""

    async def fetch() -> Correlation:
        async with await opened(url) as app:
            return await load_correlation(app, correlation_id)

    found = asyncio.run(fetch())
    if not found.runs:
        raise click.ClickException(
            f"no run with correlation id {correlation_id!r}; a correlation id is the id of the "
            f"run that began the choreography (or of the event that did), as storno show prints"
        )
    if as_json:
        echo_json(found.to_json())
    else:
        click.echo("\n".join(render_correlation(found)))


COMMANDS: tuple[Any, ...] = (outbox, correlation)
