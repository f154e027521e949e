"""A saga application for the crash tests, and the worker process they kill with SIGKILL.

The four steps of ``booking`` talk to a fake "provider": a separate SQLite file (the ledger)
holding every call the provider received (``calls``) and every effect it applied
(``effects``, ``UNIQUE(key)``). Like a real provider it applies an effect only once per
idempotency key: a repeated call with a known key is answered without a second effect. A
compensation records an undo effect keyed by the compensation key that names the forward key
it undoes. Runs started with ``fail=True`` are refused for good by ``sync_calendar`` and
compensate.

Run as a worker process::

    python tests/crash_app.py --db PATH --ledger PATH --worker-id ID [--crash-at SPEC]
        [--lease SECONDS] [--concurrency N]

It works until every run in the database has ended, then exits 0. ``--crash-at
POINT[:QUALIFIER[:N]]`` makes the process SIGKILL itself the N-th time (default 1) it reaches
POINT for a step (or run end status) named QUALIFIER. POINT is one of the engine's fault points
(``step.started``, ``step.returned``, ``compensation.started``, ``compensation.returned``,
``run.ending`` with qualifier ``completed`` or ``compensated``), a point inside the test steps
(``effect.before``, ``effect.after``: the provider has applied the effect, the answer is lost;
``undo.before``, ``undo.after``), or a point around the store: ``worker.claimed`` (a claim
of runs has committed, no step has started), ``status.written`` with the new run status as
qualifier (e.g. ``compensating``: the forward path's end is durable, no compensation has
started). Just before dying it writes a line starting with :data:`MARKER` to stderr.

``send_sms`` has a read-back (verify) function that asks the ledger whether its key was
applied, so an attempt of unknown outcome is verified instead of retried (rule 3); every
read-back is logged in ``calls`` as kind ``verify``. ``charge_card`` fails with a transient
error on its first attempt in runs whose id ends in 2 or 5 (before the provider applies
anything), so retries mix with the crashes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import storno
from storno import _faults

MARKER = "CRASH-APP SIGKILL"
STEP_NAMES = ("book_slot", "charge_card", "send_sms", "sync_calendar")
COMPENSATED_STEPS = STEP_NAMES[:3]  # sync_calendar is the step that fails, so never undone
VERIFIED_STEPS = ("send_sms",)  # steps with a read-back (verify) function
STEP_SECONDS = 0.003  # long enough for an outside kill to land inside a step

ENGINE_POINTS = frozenset(_faults.POINTS)
STEP_POINTS = frozenset({"effect.before", "effect.after", "undo.before", "undo.after"})
STORE_POINTS = frozenset({"worker.claimed", "status.written"})
ALL_POINTS = ENGINE_POINTS | STEP_POINTS | STORE_POINTS

_RETRY = storno.RetryPolicy(initial_interval=0.01, maximum_interval=0.05, maximum_attempts=10)


# --- the provider's ledger --------------------------------------------------------------------

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,          -- forward | compensate | verify
    run_id      TEXT NOT NULL,
    step        TEXT NOT NULL,
    key         TEXT NOT NULL,          -- the idempotency key the call carried
    forward_key TEXT,                   -- compensations: the key of the effect to undo
    attempt     INTEGER NOT NULL,
    seen_result TEXT,                   -- compensations: the forward result they were told;
                                        -- verify: applied | not_applied
    pid         INTEGER NOT NULL,
    at          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS effects (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    key     TEXT NOT NULL UNIQUE,       -- provider-side deduplication
    kind    TEXT NOT NULL,              -- forward | undo
    run_id  TEXT NOT NULL,
    step    TEXT NOT NULL,
    undoes  TEXT,                       -- undo effects: the forward key they undo
    pid     INTEGER NOT NULL,
    at      REAL NOT NULL
);
"""


def ledger_path() -> str:
    path = os.environ.get("CRASH_APP_LEDGER")
    if not path:
        raise RuntimeError("CRASH_APP_LEDGER is not set: the steps do not know their provider")
    return path


def connect_ledger(path: str | os.PathLike[str]) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def init_ledger(path: str | os.PathLike[str]) -> None:
    conn = connect_ledger(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(LEDGER_SCHEMA)
    finally:
        conn.close()


def _record_call(
    kind: str,
    run_id: str,
    step: str,
    key: str,
    attempt: int,
    forward_key: str | None = None,
    seen_result: str | None = None,
) -> None:
    conn = connect_ledger(ledger_path())
    try:
        conn.execute(
            "INSERT INTO calls (kind, run_id, step, key, forward_key, attempt, seen_result, pid,"
            " at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, run_id, step, key, forward_key, attempt, seen_result, os.getpid(), time.time()),
        )
    finally:
        conn.close()


def _apply_effect(kind: str, run_id: str, step: str, key: str, undoes: str | None = None) -> None:
    conn = connect_ledger(ledger_path())
    try:
        conn.execute(
            "INSERT INTO effects (key, kind, run_id, step, undoes, pid, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
            (key, kind, run_id, step, undoes, os.getpid(), time.time()),
        )
    finally:
        conn.close()


def _effect_exists(key: str) -> bool:
    conn = connect_ledger(ledger_path())
    try:
        return conn.execute("SELECT 1 FROM effects WHERE key = ?", (key,)).fetchone() is not None
    finally:
        conn.close()


# --- crashing on purpose ----------------------------------------------------------------------


class CrashSpec:
    """``POINT[:QUALIFIER[:N]]``: die the N-th time POINT is reached for QUALIFIER."""

    def __init__(self, text: str) -> None:
        parts = text.split(":")
        if not 1 <= len(parts) <= 3 or parts[0] not in ALL_POINTS:
            known = ", ".join(sorted(ALL_POINTS))
            raise ValueError(
                f"bad crash spec {text!r}: want POINT[:QUALIFIER[:N]], POINT in {known}"
            )
        self.text = text
        self.point = parts[0]
        self.qualifier = parts[1] if len(parts) > 1 and parts[1] else None
        self.nth = int(parts[2]) if len(parts) > 2 else 1
        self.seen = 0
        self._lock = threading.Lock()

    def reached(self, point: str, details: dict[str, Any]) -> None:
        if point != self.point:
            return
        if self.qualifier is not None and self.qualifier not in (
            details.get("step"),
            details.get("status"),
        ):
            return
        with self._lock:
            self.seen += 1
            if self.seen != self.nth:
                return
            line = f"{MARKER} at {self.text} (#{self.seen}) {json.dumps(details, sort_keys=True)}\n"
            os.write(2, line.encode())
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # never reached: SIGKILL cannot be caught


_crash: CrashSpec | None = None


def checkpoint(point: str, **details: Any) -> None:
    """A point inside the test's own code (a step, a compensation, the worker) to die at."""
    if _crash is not None:
        _crash.reached(point, details)


# --- the saga ---------------------------------------------------------------------------------


def _forward(ctx: storno.StepContext, fail: bool = False, flaky: bool = False) -> str:
    _record_call("forward", ctx.run_id, ctx.step, ctx.idempotency_key, ctx.attempt)
    checkpoint("effect.before", run_id=ctx.run_id, step=ctx.step, attempt=ctx.attempt)
    time.sleep(STEP_SECONDS)
    if flaky and ctx.attempt == 1 and ctx.run_id.endswith(("2", "5")):
        raise ConnectionError(f"{ctx.step}: the provider is busy, try again")
    if fail:
        raise storno.TerminalError(f"{ctx.step}: the provider refused order of run {ctx.run_id}")
    _apply_effect("forward", ctx.run_id, ctx.step, ctx.idempotency_key)
    checkpoint("effect.after", run_id=ctx.run_id, step=ctx.step, attempt=ctx.attempt)
    return expected_result(ctx.step, ctx.idempotency_key)


def _undo(ctx: storno.CompensationContext[str]) -> None:
    seen = "UNKNOWN" if ctx.result is storno.UNKNOWN else str(ctx.result)
    _record_call(
        "compensate", ctx.run_id, ctx.step, ctx.idempotency_key, ctx.attempt, ctx.forward_key, seen
    )
    checkpoint("undo.before", run_id=ctx.run_id, step=ctx.step, attempt=ctx.attempt)
    time.sleep(STEP_SECONDS)
    # Told UNKNOWN, a compensation must cope with either: there is nothing to undo when the
    # forward effect never landed.
    if ctx.result is not storno.UNKNOWN or _effect_exists(ctx.forward_key):
        _apply_effect("undo", ctx.run_id, ctx.step, ctx.idempotency_key, undoes=ctx.forward_key)
    checkpoint("undo.after", run_id=ctx.run_id, step=ctx.step, attempt=ctx.attempt)


def expected_result(step: str, key: str) -> str:
    """What the provider answers for a forward call (the same for a repeated key)."""
    return f"{step}/{key}"


@storno.step(retry=_RETRY, compensation_retry=_RETRY)
def book_slot(ctx: storno.StepContext, order: str) -> str:
    return _forward(ctx)


@book_slot.compensation
def release_slot(ctx: storno.CompensationContext[str], order: str) -> None:
    _undo(ctx)


@storno.step(retry=_RETRY, compensation_retry=_RETRY)
def charge_card(ctx: storno.StepContext, order: str, amount: int) -> str:
    return _forward(ctx, flaky=True)


@charge_card.compensation
def refund_card(ctx: storno.CompensationContext[str], order: str, amount: int) -> None:
    _undo(ctx)


@storno.step(retry=_RETRY, compensation_retry=_RETRY)
def send_sms(ctx: storno.StepContext, order: str) -> str:
    return _forward(ctx)


@send_sms.verifier
def find_sms(ctx: storno.StepContext, order: str) -> str | storno.NotApplied:
    applied = _effect_exists(ctx.idempotency_key)
    seen = "applied" if applied else "not_applied"
    _record_call("verify", ctx.run_id, ctx.step, ctx.idempotency_key, ctx.attempt, None, seen)
    return expected_result(ctx.step, ctx.idempotency_key) if applied else storno.NOT_APPLIED


@send_sms.compensation
def send_correction_sms(ctx: storno.CompensationContext[str], order: str) -> None:
    _undo(ctx)


@storno.step(retry=_RETRY, compensation_retry=_RETRY)
def sync_calendar(ctx: storno.StepContext, order: str, fail: bool) -> str:
    return _forward(ctx, fail=fail)


@sync_calendar.compensation
def remove_calendar_entry(ctx: storno.CompensationContext[str], order: str, fail: bool) -> None:
    _undo(ctx)


@storno.saga
async def booking(ctx: storno.SagaContext, order: str, fail: bool) -> list[str]:
    slot = await ctx.step(book_slot, order)
    charge = await ctx.step(charge_card, order, 100)
    sms = await ctx.step(send_sms, order)
    calendar = await ctx.step(sync_calendar, order, fail)
    return [slot, charge, sms, calendar]


STEPS = (book_slot, charge_card, send_sms, sync_calendar)


def make_app(db: str | os.PathLike[str], lease_seconds: float = 30.0) -> storno.Storno:
    url = f"sqlite:///{Path(db).resolve()}"
    return storno.Storno(url, sagas=[booking], steps=list(STEPS), lease_seconds=lease_seconds)


# --- the worker process -----------------------------------------------------------------------


async def work(
    db: str, worker_id: str, lease_seconds: float, concurrency: int, poll: float
) -> None:
    from storno._app import ENDED

    app = make_app(db, lease_seconds)
    async with app:
        claim = app.store.claim

        async def claim_and_maybe_die(*args: Any, **kwargs: Any) -> Any:
            claimed = await claim(*args, **kwargs)
            if claimed:
                checkpoint("worker.claimed", run_ids=[record.run_id for record, _ in claimed])
            return claimed

        write = app.store.write

        async def write_and_maybe_die(lease: Any, events: Any, update: Any, **kwargs: Any) -> int:
            latest = await write(lease, events, update, **kwargs)
            if update is not None:
                checkpoint("status.written", run_id=lease.run_id, status=update.status.value)
            return latest

        app.store.claim = claim_and_maybe_die  # type: ignore[method-assign]
        app.store.write = write_and_maybe_die  # type: ignore[method-assign]
        async with app.worker(concurrency=concurrency, worker_id=worker_id, poll_interval=poll):
            while True:
                runs = await app.list_runs(limit=100_000)
                if all(run.status in ENDED for run in runs):
                    return
                await asyncio.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    global _crash
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--crash-at", default=None)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--poll", type=float, default=0.02)
    args = parser.parse_args(argv)
    os.environ["CRASH_APP_LEDGER"] = str(Path(args.ledger).resolve())
    if args.crash_at:
        _crash = CrashSpec(args.crash_at)
        if _crash.point in ENGINE_POINTS:
            _faults.set_hook(_crash.reached)
    asyncio.run(work(args.db, args.worker_id, args.lease, args.concurrency, args.poll))
    return 0


if __name__ == "__main__":
    # Import ourselves by name so that step references recorded in the history read
    # ``crash_app:book_slot`` (as in the test process), not ``__main__:book_slot``.
    import crash_app

    sys.exit(crash_app.main())
