"""The ``storno`` command: run the demo, run a worker, list runs and show a run's timeline.

Every command takes ``--db URL`` (or ``$STORNO_URL``). Errors storno raises end the command
with ``Error: ...`` and exit code 1; bad options exit with code 2.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import signal
import sys
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from storno._app import DEFAULT_URL, ENDED, Storno
from storno._demo import STEP_NAMES, render_ledgers, run_demo
from storno._errors import StornoError
from storno._model import Lease, RunRecord, RunStatus
from storno._server._logging import configure_logging
from storno._store import open_store
from storno._store._migrations import backend_of, redact
from storno._store._migrations import status as schema_status
from storno._store._sqlite import SQLiteStore
from storno._store._sqlite_connection import parse_sqlite_url
from storno._views import HistoryEvent, RunInfo
from storno._worker import Worker

__all__ = ["main", "render_run"]

log = logging.getLogger("storno.cli")
_COMPENSATING = (RunStatus.COMPENSATING, RunStatus.COMPENSATED, RunStatus.COMPENSATION_FAILED)
# Logged at ERROR, as `storno serve` logs them: a dead letter or a parked run waits for a
# person, and alerts watch for errors; a compensated run is the saga working as designed.
_NEEDS_A_PERSON = (RunStatus.COMPENSATION_FAILED, RunStatus.NEEDS_ATTENTION)


# --- the timeline ------------------------------------------------------------------------


def _ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _row(position: int, name: str, width: int, state: str, attempts: int, key: str) -> str:
    tries = f"{attempts} attempt{'' if attempts == 1 else 's'}"
    return f"  #{position} {name:<{width}}  {state:<25} {tries:<11}key {key}"


def _err(error: dict[str, Any] | None) -> str:
    error = error or {}
    kind, message = error.get("type", "error"), error.get("message", "")
    return f"{kind}: {message}" if message else str(kind)


def _notes(history: list[HistoryEvent]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """What each step's attempts and compensation went through, from the history."""
    forward: dict[int, list[str]] = defaultdict(list)
    back: dict[int, list[str]] = defaultdict(list)
    for e in history:
        if e.position is None:
            continue
        d, out = e.data, forward[e.position]
        if e.type == "attempt_failed" and d.get("lost", d.get("outcome_unknown")):
            out.append(f"? attempt {d['attempt']}: outcome unknown ({_err(d.get('error'))})")
        elif e.type == "attempt_failed" and d.get("outcome_unknown"):
            out.append(
                f"x attempt {d['attempt']} failed: {_err(d.get('error'))}; the outcome stays "
                f"unknown (an earlier answer was lost)"
            )
        elif e.type == "step_completed" and d.get("late"):
            out.append(f"= attempt {d['attempt']} returned late, after the engine stopped waiting")
        elif e.type == "attempt_failed":
            out.append(f"x attempt {d['attempt']} failed: {_err(d.get('error'))}")
        elif e.type == "outcome_unknown":
            out.append(f"? attempt {d['attempt']}: outcome unknown ({d.get('reason')})")
        elif e.type == "verified" and d.get("applied"):
            out.append(f"= read-back by key: it landed, result {_short(e.value)}; not called again")
        elif e.type == "verified":
            out.append("= read-back by key: it never landed; retried with the same key")
        elif e.type == "step_failed":
            out.append(f"x gave up: {d.get('reason')}")
        elif e.type == "compensation_attempt_failed":
            back[e.position].append(f"x attempt {d['attempt']} failed: {_err(d.get('error'))}")
        elif e.type == "compensation_step_skipped":
            back[e.position].append(f"- skipped: {d.get('reason')}")
        elif e.type == "compensation_step_failed":
            back[e.position].append(f"x gave up: {_err(d.get('error'))}")
    return forward, back


def _awaited(e: HistoryEvent) -> str:
    """What a signal wait's event is about: an operator's approval, or a named signal."""
    return "approval" if e.data.get("approval") else f"signal {e.data['name']!r}"


_WAIT_NOTES: dict[str, Callable[[HistoryEvent], str]] = {
    "timer_started": lambda e: f"sleep until {_ts(e.data['until'])} UTC",
    "timer_fired": lambda e: "timer fired",
    "signal_wait_started": lambda e: f"wait for {_awaited(e)}",
    "signal_received": lambda e: f"{_awaited(e)} received: {_short(e.value)}",
    "signal_timed_out": lambda e: f"{_awaited(e)} timed out",
    "approval_ignored": lambda e: f"approval by {e.data.get('by')} ignored: given before the wait",
    "cancel_requested": lambda e: f"cancel by {e.data.get('by')}: {e.data.get('reason')}",
    "cancel_refused": lambda e: f"cancel by {e.data.get('by')} refused (past the pivot)",
    "operator_action": lambda e: (
        f"{e.data.get('action')} by {e.data.get('by')}: {e.data.get('note')}"
    ),
}


def render_run(info: RunInfo) -> list[str]:
    """A run's timeline as text: header, forward steps, compensations in the order they ran."""
    lines = [
        f"run {info.run_id}  saga {info.saga}  status {info.status.value}",
        f"  created {_ts(info.created_at)}  updated {_ts(info.updated_at)} (UTC)",
    ]
    if info.parent_run_id:
        lines.append(f"  child of run {info.parent_run_id}")
    if info.status is RunStatus.WAITING:
        until = f"until {_ts(info.wake_at)} UTC or a message" if info.wake_at else "for a message"
        lines.append(f"  waiting {until}")
    if info.state:
        lines.append(f"  published {_short(info.state, 90)}")
    if info.status is RunStatus.COMPLETED:
        lines.append(f"  result {_short(info.result, 90)}")
    if info.error:
        lines.append(f"  error  {info.error.get('message') or info.error.get('type')}")
    forward, back = _notes(info.history)
    width = max([len(s.name) for s in info.steps] + [4])
    lines += ["", "forward steps"]
    if not info.steps:
        lines.append("  (none yet)")
    for s in info.steps:
        state = f"{s.kind:<14} {s.status}"
        lines.append(_row(s.position, s.name, width, state, s.attempts, s.idempotency_key))
        lines += [f"      {note}" for note in forward[s.position]]
        if s.child_run_id:
            lines.append(f"      child run {s.child_run_id}")
        if s.status == "completed":
            lines.append(f"      -> {_short(s.result)}")
    waits = [e for e in info.history if e.type in _WAIT_NOTES]
    if waits:
        lines += ["", "waits, signals and operator actions"]
    for e in waits:
        where = f"#{e.position} " if e.position is not None else ""
        lines.append(f"  {_ts(e.at)}  {where}{_WAIT_NOTES[e.type](e)}")
    first_seen: dict[int, int] = {}
    for e in info.history:
        if e.type.startswith("compensation_step_") and e.position is not None:
            first_seen.setdefault(e.position, e.seq)
    undone = sorted(
        [(s, c) for s in info.steps if (c := s.compensation) is not None],
        key=lambda pair: (first_seen.get(pair[0].position, 1 << 62), -pair[0].position),
    )
    if undone:
        lines += ["", "compensations (in the order they ran: last step first)"]
    elif info.status in _COMPENSATING:
        lines += ["", "compensations: none (no compensable step had taken effect)"]
    for s, c in undone:
        state = f"{'compensation':<14} {c.status}"
        lines.append(_row(s.position, s.name, width, state, c.attempts, c.idempotency_key))
        lines += [f"      {note}" for note in back[s.position]]
    return lines


# --- plumbing ----------------------------------------------------------------------------


class _Group(click.Group):
    """Turns storno's own errors (whose messages say what to do) into ``Error: ...``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StornoError as exc:
            raise click.ClickException(str(exc)) from exc


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


_db_option = click.option(
    "--db",
    "url",
    envvar="STORNO_URL",
    show_envvar=True,
    default=DEFAULT_URL,
    show_default=True,
    metavar="URL",
    help="Database holding the runs, e.g. sqlite:///storno.db.",
)


def _existing(url: str) -> Storno:
    """An application for reading runs; refuses to create a database file that is not there
    (:func:`_opened` also checks that the database holds storno's tables)."""
    app = Storno(url)
    if isinstance(app.store, SQLiteStore) and not app.store.path.exists():
        raise click.ClickException(
            f"no storno database at {str(app.store.path)!r} (from --db {redact(url)}); pass "
            f"the --db URL your application uses, or create one with `storno demo`"
        )
    return app


async def _opened(url: str) -> Storno:
    """:func:`_existing`, opened, after checking that the database holds storno's tables:
    opening would add them to a mistyped PostgreSQL schema or to any SQLite file."""
    app = _existing(url)
    info = await schema_status(url)
    if info.exists:
        await app.open()
        return app
    if isinstance(app.store, SQLiteStore):
        path = str(app.store.path)
        what = "an empty file" if app.store.path.stat().st_size == 0 else "it has no storno tables"
        raise click.ClickException(
            f"{path!r} is not a storno database ({what}; from --db {redact(url)}); read "
            f"commands leave it as it is. Pass the --db URL your application uses"
        )
    raise click.ClickException(
        f"no storno tables at {redact(url)}; pass the --db URL your application uses, or "
        f"create them with `storno db upgrade`"
    )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="storno")
def main() -> None:
    """storno: durable sagas. Steps across systems either all take effect or are compensated
    in reverse, and survive crashes."""


# --- demo --------------------------------------------------------------------------------


@main.command(short_help="Run the booking saga against fake providers.")
@click.option(
    "--fail-at",
    type=click.Choice(STEP_NAMES),
    help="Make this step fail for good, so that the run compensates in reverse.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run and ledgers as JSON.")
@_db_option
def demo(fail_at: str | None, as_json: bool, url: str) -> None:
    """Run the booking saga (book slot, charge card, send SMS, sync calendar) against fake
    providers. The payment provider loses its first answer: the read-back finds the charge."""
    result = asyncio.run(run_demo(url, fail_at))
    info = result.info
    if as_json:
        _echo_json({**info.to_json(), "ledgers": result.ledgers})
    else:
        click.echo("\n".join(render_run(info) + render_ledgers(result.ledgers)))
    if info.status not in (RunStatus.COMPLETED, RunStatus.COMPENSATED):
        raise click.ClickException(f"the demo run ended {info.status.value}; that is a bug")


# --- worker ------------------------------------------------------------------------------


def _bad_app(message: str) -> click.BadParameter:
    ctx = click.get_current_context(silent=True)
    return click.BadParameter(message, ctx=ctx, param_hint="'--app'")


def _load_app(ref: str) -> Storno:
    """The Storno application named by ``MODULE:ATTR`` (an instance, or a factory)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise _bad_app(f"{ref!r} is not MODULE:ATTR, e.g. myproject.sagas:app")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise _bad_app(
                f"no module named {exc.name!r} (looked in {Path.cwd()} and sys.path)"
            ) from exc
        raise _bad_app(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise _bad_app(f"importing {module_name!r} raised {exc!r}") from exc
    found: Any = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise _bad_app(f"module {module_name!r} has no attribute {attr!r}")
        found = getattr(found, part)
    if callable(found) and not isinstance(found, Storno):
        try:
            found = found()
        except Exception as exc:
            raise _bad_app(f"calling {ref}() raised {exc!r}") from exc
    if not isinstance(found, Storno):
        raise _bad_app(
            f"{ref} is of type {type(found).__name__}, not a storno.Storno application "
            f"(or a function without arguments that returns one)"
        )
    return found


def _same_database(a: str, b: str) -> bool:
    """Whether two URLs name one database (SQLite paths compared once resolved)."""
    if a == b:
        return True
    if backend_of(a) == backend_of(b) == "sqlite":
        return parse_sqlite_url(a)[0].resolve() == parse_sqlite_url(b)[0].resolve()
    return False


def _point_at(app: Storno, ref: str, url: str) -> None:
    """Make ``app`` use the database the command was given (``--db``, else ``$STORNO_URL``),
    or refuse to go on when the application's code names another one.

    A URL written in ``Storno(...)`` and a different one in the environment would otherwise
    leave the worker on one database while `storno list` reads the other.
    """
    source = click.get_current_context().get_parameter_source("url")
    if source is click.core.ParameterSource.COMMANDLINE:
        where = "--db"
    elif source is click.core.ParameterSource.ENVIRONMENT:
        where = "$STORNO_URL"
    else:
        return  # the command names no database: the application's own URL it is
    if app.url_source == "argument":
        if not _same_database(app.url, url):
            raise click.ClickException(
                f"{ref} names its database in its code ({redact(app.url)}) but {where} says "
                f"{redact(url)}; refusing to start on one while the other is meant. Write "
                f"Storno(sagas=[...]) without a URL so that {where} decides, or make them "
                f"the same"
            )
        return
    if app.url != url:
        # Safe before the app is opened: the store connects on open().
        app.url, app.store = url, open_store(url)


class _LoggingWorker(Worker):
    """A worker that logs each run it picks up and how it left it.

    The worker has no hook for this yet, so the CLI wraps its per-run method.
    """

    async def _execute(self, record: RunRecord, lease: Lease, *rest: Any) -> None:
        log.info("run %s: picked up (saga %s, %s)", record.run_id, record.saga, record.status)
        try:
            await super()._execute(record, lease, *rest)
        finally:
            now = await self.app.store.get_run(record.run_id)
            if now is not None and now.status in ENDED:
                error = f": {now.error.get('message')}" if now.error else ""
                level = logging.ERROR if now.status in _NEEDS_A_PERSON else logging.INFO
                log.log(level, "run %s: %s%s", record.run_id, now.status.value, error)
            elif now is not None:
                log.info("run %s: left %s, to be resumed", record.run_id, now.status.value)


async def _work(app: Storno, concurrency: int, worker_id: str | None, poll: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with app:
        worker = _LoggingWorker(
            app, concurrency=concurrency, poll_interval=poll, worker_id=worker_id
        )
        await worker.start()
        names = ", ".join(app.saga_names) or "none: it will claim nothing"
        log.info("worker %s started on %s (sagas: %s)", worker.id, redact(app.url), names)
        await stop.wait()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)  # a second signal ends the process at once
        log.info("worker %s stopping; %d run(s) in flight", worker.id, len(worker.active_runs))
        await worker.stop()
        log.info("worker %s stopped", worker.id)


@main.command(short_help="Execute runs until SIGINT or SIGTERM.")
@click.option("--app", "app_ref", required=True, metavar="MODULE:ATTR", help="The application.")
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--worker-id", help="Stable id of this worker slot (a pod name); default random.")
@click.option(
    "--poll-interval", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True
)
@_db_option
def worker(
    app_ref: str,
    concurrency: int,
    worker_id: str | None,
    poll_interval: float,
    url: str,
) -> None:
    """Execute runs of the application's sagas until SIGINT or SIGTERM.

    MODULE:ATTR names a storno.Storno instance (or a function returning one); the current
    folder is importable. The database is --db, else $STORNO_URL, else the application's
    own; an application whose code names a URL refuses to start when --db or $STORNO_URL
    names another.
    """
    configure_logging("text")  # escapes control characters: a run's text cannot forge lines
    app = _load_app(app_ref)
    _point_at(app, app_ref, url)
    asyncio.run(_work(app, concurrency, worker_id, poll_interval))


# --- list and show -----------------------------------------------------------------------


def _summary(run: RunInfo) -> dict[str, Any]:
    """A listed run as JSON: no steps or history, which listing does not load."""
    out = run.to_json(with_history=False)
    del out["steps"]
    return out


@main.command(name="list")
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
@_db_option
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
        async with await _opened(url) as app:
            runs = await app.list_runs(status=status, saga=saga, limit=limit, offset=offset)
            if offset == 0 and len(runs) < limit:
                return runs, len(runs)  # all of them: no need to count
            return runs, await app.count_runs(status=status, saga=saga)

    runs, total = asyncio.run(fetch())
    shown = offset > 0 or total > len(runs)
    if as_json:
        page = {"total": total, "offset": offset, "limit": limit, "truncated": shown}
        _echo_json({"runs": [_summary(r) for r in runs], **page})
        return
    rows = [("ID", "SAGA", "STATUS", "CREATED (UTC)", "UPDATED (UTC)")]
    rows += [(r.run_id, r.saga, r.status.value, _ts(r.created_at), _ts(r.updated_at)) for r in runs]
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


@main.command(short_help="Show a run's timeline.")
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the run with its history as JSON.")
@_db_option
def show(run_id: str, as_json: bool, url: str) -> None:
    """Show a run's timeline: steps, attempts, keys, unknown outcomes, compensations."""

    async def fetch() -> RunInfo:
        async with await _opened(url) as app:
            return await app.describe(run_id)

    info = asyncio.run(fetch())
    if as_json:
        _echo_json(info.to_json())
    else:
        click.echo("\n".join(render_run(info)))


def _register_operator_commands() -> None:
    from storno._cli_ops import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_register_operator_commands()


def _register_db_commands() -> None:
    from storno._cli_db import db

    main.add_command(db)


_register_db_commands()


def _register_server_commands() -> None:
    from storno._cli_serve import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_register_server_commands()
