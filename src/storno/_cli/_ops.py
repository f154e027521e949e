"""Operator commands: talk to runs (signal, approve, reject, cancel) and handle the runs that
need a person (retry, compensate, resolve).

Every action is journaled in the run's history with who did it and why: ``--by`` defaults to
``$STORNO_ACTOR``, else the login name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from storno._app import Storno
from storno._cli._common import by_option, db_option, echo_json, opened, summary, ts

__all__ = ["COMMANDS"]

T = TypeVar("T")


def _with_app(url: str, action: Callable[[Storno], Awaitable[T]]) -> T:
    async def go() -> T:
        async with await opened(url) as app:
            return await action(app)

    return asyncio.run(go())


def _report(as_json: bool, run_id: str, what: str, **extra: Any) -> None:
    if as_json:
        echo_json({"run_id": run_id, "action": what, **extra})
    else:
        details = "".join(f"  {k}={v}" for k, v in extra.items())
        click.echo(f"{what}: run {run_id}{details}")


@click.command(short_help="Send a signal to a run.")
@click.argument("run_id", metavar="RUN")
@click.argument("name")
@click.option("--data", help="The signal's data as JSON, e.g. '{\"ok\": true}'.")
@click.option("--id", "message_id", help="An id: a repeated id is delivered once.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@db_option
def signal(
    run_id: str, name: str, data: str | None, message_id: str | None, as_json: bool, url: str
) -> None:
    """Send signal NAME to RUN. It is buffered until the run waits for it."""
    try:
        value = None if data is None else json.loads(data)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--data") from exc
    stored = _with_app(url, lambda app: app.signal(run_id, name, value, id=message_id))
    _report(as_json, run_id, "signal", name=name, delivered="new" if stored else "duplicate")


@click.command(short_help="Approve a run waiting for approval.")
@click.argument("run_id", metavar="RUN")
@click.option("--note", help="Why; recorded with the approval.")
@click.option(
    "--digest",
    help="The digest of what you approve (shown by storno show): refused if the run now asks "
    "for something else.",
)
@by_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@db_option
def approve(
    run_id: str, note: str | None, digest: str | None, by: str, as_json: bool, url: str
) -> None:
    """Approve RUN at its ctx.wait_for_approval()."""
    _with_app(url, lambda app: app.approve(run_id, by=by, note=note, digest=digest))
    _report(as_json, run_id, "approved", by=by)


@click.command(short_help="Reject a run waiting for approval (it compensates).")
@click.argument("run_id", metavar="RUN")
@click.option("--reason", required=True, help="Why; recorded with the rejection.")
@by_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@db_option
def reject(run_id: str, reason: str, by: str, as_json: bool, url: str) -> None:
    """Reject RUN at its ctx.wait_for_approval(); it compensates unless its code handles it."""
    _with_app(url, lambda app: app.reject(run_id, by=by, reason=reason))
    _report(as_json, run_id, "rejected", by=by)


@click.command(short_help="Cancel a run: compensate it and end it cancelled.")
@click.argument("run_id", metavar="RUN")
@click.option("--reason", required=True, help="Why; recorded in the run's history.")
@by_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@db_option
def cancel(run_id: str, reason: str, by: str, as_json: bool, url: str) -> None:
    """Cancel RUN. Refused after its point of no return; a running run stops at its next step."""
    _with_app(url, lambda app: app.cancel(run_id, by=by, reason=reason))
    _report(as_json, run_id, "cancel requested", by=by)


@click.command(name="dead-letters", short_help="List runs whose compensation kept failing.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@db_option
def dead_letters(limit: int, as_json: bool, url: str) -> None:
    """List dead letters (compensation_failed), newest first, with why each failed."""
    runs = _with_app(url, lambda app: app.dead_letters(limit=limit))
    if as_json:
        echo_json([summary(r) for r in runs])
        return
    if not runs:
        click.echo("(no dead letters)")
    for run in runs:
        message = (run.error or {}).get("message", "")
        click.echo(f"{run.run_id}  {run.saga}  since {ts(run.updated_at)} UTC\n  {message}")


@click.command(short_help="Retry a run that needs a person.")
@click.argument("run_id", metavar="RUN")
@click.option("--note", help="Why it should work now; recorded.")
@by_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@db_option
def retry(run_id: str, note: str | None, by: str, as_json: bool, url: str) -> None:
    """Retry RUN: a dead letter's compensation where it failed, or a run in needs_attention
    under the current code (its failed step again, under the same key)."""
    _with_app(url, lambda app: app.retry(run_id, by=by, note=note))
    _report(as_json, run_id, "retry", by=by)


def _outcomes(values: tuple[str, ...]) -> list[str]:
    steps = []
    for value in values:
        step, _, outcome = value.partition("=")
        if not step or outcome != "not_applied":
            raise click.BadParameter(
                f"expected STEP=not_applied, got {value!r}", param_hint="--outcome"
            )
        steps.append(step)
    return steps


@click.command(short_help="Compensate a run in needs_attention.")
@click.argument("run_id", metavar="RUN")
@click.option(
    "--outcome",
    "outcomes",
    multiple=True,
    metavar="STEP=not_applied",
    help="A step of unknown outcome that you checked did not take effect (by name or "
    "position); recorded. Repeat for several.",
)
@click.option("--note", help="What you checked; recorded.")
@by_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@db_option
def compensate(
    run_id: str, outcomes: tuple[str, ...], note: str | None, by: str, as_json: bool, url: str
) -> None:
    """Compensate RUN now. Refused where a step at or after its point of no return took
    effect or may have, unless --outcome says it did not."""
    steps = _outcomes(outcomes)
    _with_app(url, lambda app: app.compensate(run_id, by=by, note=note, not_applied=steps))
    _report(as_json, run_id, "compensate", by=by)


@click.command(short_help="Close a run that needs a person as handled by hand.")
@click.argument("run_id", metavar="RUN")
@click.option("--note", required=True, help="What was done by hand; recorded.")
@click.option(
    "--as",
    "outcome",
    type=click.Choice(["completed", "compensated"]),
    help="How the run ended by hand (needs_attention runs only; a dead letter is compensated).",
)
@by_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@db_option
def resolve(run_id: str, note: str, outcome: str | None, by: str, as_json: bool, url: str) -> None:
    """Mark RUN as handled by hand, with a note saying what was done: a dead letter as
    compensated, a run in needs_attention as completed or compensated (--as)."""
    _with_app(url, lambda app: app.resolve(run_id, by=by, note=note, outcome=outcome))
    _report(as_json, run_id, "resolved", by=by)


COMMANDS = (signal, approve, reject, cancel, dead_letters, retry, compensate, resolve)
