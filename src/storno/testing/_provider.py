"""A fake third-party provider for tests: idempotency keys, faults, and a durable ledger.

It behaves like a payment or messaging API that honours idempotency keys: a repeat of a key
returns the first call's answer (or replays its decline) and changes nothing. Its ledger is a
SQLite file, so what landed survives a killed process. Faults come from a
:class:`~storno.testing.Schedule` per run: 500s and 429s that come *before* the key check (so
a retry that gets one says nothing about an earlier attempt), answers lost after the write,
writes that land late, outages, declines.

Steps pass their context, from which the provider learns the run, the step's position and
the idempotency key (for a compensation, also the forward key it undoes)::

    @storno.step(verify=lambda ctx, amount: provider.lookup(ctx, "charge"))
    def charge(ctx, amount):
        return provider.call(ctx, "charge", amount=amount)

    @charge.compensation
    def refund(ctx, amount):
        provider.undo(ctx, "refund")
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storno._definitions import NOT_APPLIED, CompensationContext, StepContext
from storno._errors import TerminalError
from storno._model import StepKind
from storno.testing._faultplan import Fault, RequestKind, Schedule

__all__ = [
    "Declined",
    "Effect",
    "FakeProvider",
    "ProviderConflict",
    "ProviderError",
    "ProviderThrottled",
    "ProviderTimeout",
    "ProviderUnavailable",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,          -- the idempotency key of the forward call
    run_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    op TEXT NOT NULL,
    kind TEXT NOT NULL,
    fields TEXT NOT NULL,              -- JSON
    result TEXT,                       -- JSON; NULL while pending or when declined
    status TEXT NOT NULL,              -- applied | declined | pending
    lands_at INTEGER                   -- pending: the run's request number it lands at
);
CREATE TABLE IF NOT EXISTS undos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,          -- the compensation's idempotency key
    forward_key TEXT NOT NULL,
    run_id TEXT NOT NULL,
    op TEXT NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS effects_run ON effects (run_id);
CREATE INDEX IF NOT EXISTS undos_forward ON undos (forward_key);
"""


class ProviderError(Exception):
    """An error answer from the fake provider; ``status`` is its HTTP-like status code."""

    status = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class ProviderUnavailable(ProviderError):
    """A 500 or 503 answered before the provider looked at the idempotency key."""


class ProviderThrottled(ProviderError):
    """A 429 answered before the key check; ``retry_after`` says when to try again
    (seconds), as an HTTP ``Retry-After`` header does."""

    status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProviderConflict(ProviderError):
    """A 409: a request under this idempotency key is still being processed."""

    status = 409


class ProviderTimeout(ProviderError, TimeoutError):
    """The answer never came: the request may or may not have landed. A ``TimeoutError``,
    so the engine records the attempt's outcome as unknown."""

    status = 504


class Declined(ProviderError, TerminalError):
    """The provider refused the call for good (a card declined); recorded under the key, so a
    repeat of the key is declined again. A :class:`storno.TerminalError`: not retried."""

    status = 402


@dataclass(frozen=True, slots=True)
class Effect:
    """One forward call the provider recorded, and how often it was undone."""

    key: str
    run_id: str
    position: int
    op: str
    kind: StepKind
    fields: dict[str, Any]
    result: Any
    status: str
    """``applied``, ``declined``, or ``pending`` (a late write that has not landed yet)."""
    undone: int
    """How many undos (by distinct compensation keys) reversed it."""

    @property
    def applied(self) -> bool:
        return self.status == "applied"

    def business(self) -> tuple[Hashable, ...]:
        """The effect in business terms, without run or key: ``(op, (field, value), ...)``."""
        return (self.op, *sorted((k, _hashable(v)) for k, v in self.fields.items()))


def _hashable(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value  # type: ignore[no-any-return]


class FakeProvider:
    """A fake third-party API with idempotency keys and a durable ledger in a SQLite file.

    ``operations`` declares each operation with its step kind (compensable, pivot,
    retryable, noncompensable), so that checks know which effects may be undone. Several
    processes may open the same file; in one process the provider is safe to share between
    threads (sync steps) and the event loop (async steps).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        operations: Mapping[str, StepKind | str],
    ) -> None:
        self.path = Path(path)
        self.operations = {op: StepKind.parse(kind) for op, kind in operations.items()}
        if not self.operations:
            raise ValueError("declare the provider's operations: {'charge': 'compensable', ...}")
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL survives a killed process (not a power cut): what a test of crashes needs.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._default: Schedule | None = None
        self._schedules: dict[str, Schedule] = {}
        self._requests: Counter[str] = Counter()  # requests per run
        self._matched: dict[tuple[str, int], int] = {}  # (run, fault index) -> matches so far
        self.requests: list[tuple[str, RequestKind, str, str]] = []
        """Every request in this process: (run id, call/undo/lookup, operation, answer)."""

    def __repr__(self) -> str:
        return f"<FakeProvider {self.path}>"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> FakeProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- faults --------------------------------------------------------------------------

    def schedule(self, schedule: Schedule, *, run_id: str | None = None) -> None:
        """Apply ``schedule`` to the run ``run_id`` (``None``: to every run without one of
        its own). Its faults count that run's requests from now on."""
        with self._lock:
            if run_id is None:
                self._default = schedule
                self._matched = {k: v for k, v in self._matched.items() if k[0] in self._schedules}
            else:
                self._schedules[run_id] = schedule
                self._requests.pop(run_id, None)
                self._matched = {k: v for k, v in self._matched.items() if k[0] != run_id}

    def clear_faults(self) -> None:
        """No faults for any run from now on."""
        with self._lock:
            self._default = None
            self._schedules.clear()
            self._requests.clear()
            self._matched.clear()

    def _schedule_of(self, run_id: str) -> Schedule | None:
        return self._schedules.get(run_id, self._default)

    def _begin(self, run_id: str, on: RequestKind, op: str) -> tuple[int, Fault | None]:
        """Count the request, land the run's late writes now due, and raise a fault that
        comes before the key check. Returns the request's number and the fault that applies
        after the key check, if any."""
        self._requests[run_id] += 1
        number = self._requests[run_id]
        self._conn.execute(
            "UPDATE effects SET status = 'applied', lands_at = NULL "
            "WHERE run_id = ? AND status = 'pending' AND lands_at <= ?",
            (run_id, number),
        )
        schedule = self._schedule_of(run_id)
        if schedule is None:
            return number, None
        for outage in schedule.outages:
            if outage.covers(number):
                self._note(run_id, on, op, "503 outage")
                raise ProviderUnavailable(
                    f"503: the provider is down (request #{number} of run {run_id})", status=503
                )
        # Every fault counts the requests it matches, whichever of them fires.
        firing: list[Fault] = []
        for index, fault in enumerate(schedule.faults):
            if fault.matches(on, op):
                seen = self._matched[run_id, index] = self._matched.get((run_id, index), 0) + 1
                if fault.nth <= seen < fault.nth + fault.times:
                    firing.append(fault)
        for fault in firing:
            if fault.kind == "error":
                self._note(run_id, on, op, "500")
                raise ProviderUnavailable(f"500: internal error ({on} {op}, run {run_id})")
            if fault.kind == "throttle":
                self._note(run_id, on, op, "429")
                raise ProviderThrottled(
                    f"429: too many requests ({on} {op}, run {run_id})",
                    retry_after=fault.retry_after,
                )
        after = firing[0] if firing else None
        return number, after

    def _note(self, run_id: str, on: RequestKind, op: str, answer: str) -> None:
        self.requests.append((run_id, on, op, answer))

    # --- requests ------------------------------------------------------------------------

    def call(self, ctx: StepContext, op: str, *, key: str | None = None, **fields: Any) -> Any:
        """Make the forward call ``op`` with ``fields`` under the step's idempotency key
        (or ``key``); returns ``{"id": ..., "op": op, **fields}``, or the first answer given
        under the key."""
        kind = self._kind(op)
        key = key or ctx.idempotency_key
        with self._lock:
            number, fault = self._begin(ctx.run_id, "call", op)
            row = self._conn.execute(
                "SELECT status, result FROM effects WHERE key = ?", (key,)
            ).fetchone()
            if row is not None:
                status, result = row
                if status == "pending":
                    self._note(ctx.run_id, "call", op, "409")
                    raise ProviderConflict(f"409: a request under key {key} is in progress")
                if status == "declined":
                    self._note(ctx.run_id, "call", op, "declined again")
                    raise Declined(f"{op} declined (replayed under key {key})")
                answer = json.loads(result)
                self._lose_answer(ctx.run_id, "call", op, fault, "replayed")
                self._note(ctx.run_id, "call", op, "replayed")
                return answer
            if fault is not None and fault.kind == "decline":
                self._insert(key, ctx, op, kind, fields, None, "declined")
                self._note(ctx.run_id, "call", op, "declined")
                raise Declined(f"{op} declined (key {key})")
            answer = {"id": f"{op}-{key[-8:]}", "op": op, **fields}
            if fault is not None and fault.kind == "late":
                self._insert(key, ctx, op, kind, fields, answer, "pending", number)
                self._conn.execute(
                    "UPDATE effects SET lands_at = ? WHERE key = ?",
                    (number + fault.lands_after, key),
                )
                self._note(ctx.run_id, "call", op, "lost, lands late")
                raise ProviderTimeout(f"504: no answer to {op} (it is still being processed)")
            self._insert(key, ctx, op, kind, fields, answer, "applied")
            self._lose_answer(ctx.run_id, "call", op, fault, "applied")
            self._note(ctx.run_id, "call", op, "applied")
            return answer

    def lookup(self, ctx: StepContext, op: str, *, key: str | None = None) -> Any:
        """Read back the call under the step's key (or ``key``), for a verify function:
        its answer if it landed, :data:`storno.NOT_APPLIED` if nothing (or a decline)
        landed. A write still in progress answers 409."""
        self._kind(op)
        key = key or ctx.idempotency_key
        with self._lock:
            _, fault = self._begin(ctx.run_id, "lookup", op)
            row = self._conn.execute(
                "SELECT status, result FROM effects WHERE key = ?", (key,)
            ).fetchone()
            self._lose_answer(ctx.run_id, "lookup", op, fault, "looked up")
            if row is not None and row[0] == "pending":
                self._note(ctx.run_id, "lookup", op, "409")
                raise ProviderConflict(f"409: a request under key {key} is in progress")
            self._note(ctx.run_id, "lookup", op, "found" if row else "not found")
            if row is None or row[0] == "declined":
                return NOT_APPLIED
            return json.loads(row[1])

    def undo(self, ctx: CompensationContext[Any], op: str = "undo") -> Any:
        """Undo what landed under ``ctx.forward_key``, once per compensation key: returns
        ``{"id": ..., "undid": ...}`` (the first answer again on a repeat), or ``None`` when
        nothing landed under the forward key (a no-op). A forward write still in progress
        answers 409."""
        with self._lock:
            forward = self._conn.execute(
                "SELECT op FROM effects WHERE key = ?", (ctx.forward_key,)
            ).fetchone()
            # Faults name the forward operation: "undo of charge", whatever the undo is called.
            _, fault = self._begin(ctx.run_id, "undo", forward[0] if forward else op)
            done = self._conn.execute(
                "SELECT result FROM undos WHERE key = ?", (ctx.idempotency_key,)
            ).fetchone()
            if done is not None:
                self._lose_answer(ctx.run_id, "undo", op, fault, "replayed")
                self._note(ctx.run_id, "undo", op, "replayed")
                return json.loads(done[0])
            row = self._conn.execute(
                "SELECT status, result, kind FROM effects WHERE key = ?", (ctx.forward_key,)
            ).fetchone()
            if row is not None and row[0] == "pending":
                self._note(ctx.run_id, "undo", op, "409")
                raise ProviderConflict(f"409: the call under key {ctx.forward_key} is in progress")
            if row is None or row[0] != "applied":
                self._lose_answer(ctx.run_id, "undo", op, fault, "nothing to undo")
                self._note(ctx.run_id, "undo", op, "nothing to undo")
                return None
            if StepKind(row[2]) is not StepKind.COMPENSABLE:
                raise ValueError(f"a {row[2]} effect cannot be undone (key {ctx.forward_key})")
            answer = {"id": f"{op}-{ctx.idempotency_key[-8:]}", "undid": json.loads(row[1])["id"]}
            self._conn.execute(
                "INSERT INTO undos (key, forward_key, run_id, op, result) VALUES (?, ?, ?, ?, ?)",
                (ctx.idempotency_key, ctx.forward_key, ctx.run_id, op, json.dumps(answer)),
            )
            self._lose_answer(ctx.run_id, "undo", op, fault, "undone")
            self._note(ctx.run_id, "undo", op, "undone")
            return answer

    def _kind(self, op: str) -> StepKind:
        try:
            return self.operations[op]
        except KeyError:
            known = ", ".join(self.operations)
            raise ValueError(f"unknown operation {op!r}; the provider declares {known}") from None

    def _insert(
        self,
        key: str,
        ctx: StepContext,
        op: str,
        kind: StepKind,
        fields: dict[str, Any],
        answer: Any,
        status: str,
        lands_at: int | None = None,
    ) -> None:
        self._conn.execute(
            "INSERT INTO effects (key, run_id, position, op, kind, fields, result, status, "
            "lands_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                ctx.run_id,
                ctx.position,
                op,
                kind.value,
                json.dumps(fields),
                None if answer is None else json.dumps(answer),
                status,
                lands_at,
            ),
        )

    def _lose_answer(
        self, run_id: str, on: RequestKind, op: str, fault: Fault | None, what: str
    ) -> None:
        """A ``drop`` fault: the request was handled, its answer never arrives."""
        if fault is not None and fault.kind == "drop":
            self._note(run_id, on, op, f"{what}, answer lost")
            raise ProviderTimeout(f"504: the answer to {op} was lost ({what})")

    # --- the ledger ----------------------------------------------------------------------

    def land_pending(self) -> int:
        """Land every late write still in progress now (a check does this once the runs it
        started have ended); returns how many landed."""
        with self._lock:
            cursor = self._conn.execute(
                "UPDATE effects SET status = 'applied', lands_at = NULL WHERE status = 'pending'"
            )
            return cursor.rowcount

    def ledger(self, run_id: str | None = None) -> list[Effect]:
        """Every forward call recorded (for one run, or all), oldest first, with its undos."""
        where, params = ("WHERE e.run_id = ?", (run_id,)) if run_id is not None else ("", ())
        with self._lock:
            rows = self._conn.execute(
                "SELECT e.key, e.run_id, e.position, e.op, e.kind, e.fields, e.result, "
                "e.status, (SELECT count(*) FROM undos u WHERE u.forward_key = e.key) "
                f"FROM effects e {where} ORDER BY e.seq",
                params,
            ).fetchall()
        return [
            Effect(
                key,
                run,
                position,
                op,
                StepKind(kind),
                json.loads(fields),
                None if result is None else json.loads(result),
                status,
                undone,
            )
            for key, run, position, op, kind, fields, result, status, undone in rows
        ]

    def effects(self, run_id: str | None = None) -> Counter[Hashable]:
        """What is in place, in business terms: each applied effect counts 1, less one per
        undo. Pass it to :func:`storno.testing.check_failure_points` as ``effects=``."""
        counts: Counter[Hashable] = Counter()
        for effect in self.ledger(run_id):
            if effect.applied:
                counts[effect.business()] += 1 - effect.undone
        return Counter({k: v for k, v in counts.items() if v})
