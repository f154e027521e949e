"""A run's history as one presentation model, drawn by ``storno show`` and the dashboard.

Built once from a :class:`~storno._views.RunInfo` (whose steps come from the engine's fold):
the forward path by position (steps and child runs with their attempts and what each attempt
went through: failures, unknown outcomes, read-backs, a late return, the give-up; the waits;
and the events it emitted), the compensations in the order they ran, and the run's own events
(waits, signals, approvals, cancel requests, operator actions) in history order, with the
event that started the run and the events that sent it signals (:mod:`storno._correlation`).
It says what happened, never how to word it: the CLI and the dashboard each word it their way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from storno._correlation import Cause, Emitted, cause_of, emitted_of
from storno._history import is_approval_wait
from storno._model import RunStatus
from storno._views import HistoryEvent, RunInfo, StepInfo

__all__ = [
    "Attempt",
    "Compensation",
    "ForwardItem",
    "Note",
    "RunEvent",
    "Superseded",
    "Timeline",
    "build_timeline",
]

NoteKind = Literal[
    "started",  # an attempt began
    "completed",  # it returned
    "late",  # it returned after the engine had stopped waiting for it
    "lost",  # its answer was lost: the outcome is unknown
    "failed",  # it failed
    "still_unknown",  # it failed, and an earlier lost answer keeps the outcome unknown
    "unknown",  # no outcome was recorded, or the call may still land
    "readback_failed",  # the read-back by key could not tell
    "landed",  # the read-back found it: the result is the step's
    "not_landed",  # the read-back found no trace: the step is attempted again
    "gave_up",  # the step's (or compensation's) forward path ended
    "skipped",  # a compensation found nothing to undo
    "child_completed",
    "child_failed",
]


@dataclass(frozen=True, slots=True)
class Note:
    """One thing that happened to a step's attempt or to its compensation."""

    kind: NoteKind
    attempt: int
    at: float
    error: dict[str, Any] | None = None
    reason: str | None = None
    value: Any = None


@dataclass(slots=True)
class Attempt:
    """One attempt of a step or compensation: when, how it ended, what a read-back said."""

    number: int
    started_at: float | None = None
    ended_at: float | None = None
    outcome: str = "running"  # running | completed | failed | unknown | cancelled
    error: dict[str, Any] | None = None
    unknown_reason: str | None = None
    readback: str | None = None  # landed | not landed | failed
    readback_value: Any = None
    late: bool = False  # it returned after the engine stopped waiting for it

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(self.ended_at - self.started_at, 0.0)


@dataclass(slots=True)
class ForwardItem:
    """One forward position: a step or child run with its attempts, or a durable wait."""

    position: int
    kind: str  # step | child | sleep | signal | approval | value (a recorded value) | emit
    name: str
    status: str  # a step's (see StepInfo); a wait's: waiting | done | timed out
    step: StepInfo | None = None
    attempts: list[Attempt] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)  # in history order
    gave_up: str | None = None  # why the step's forward path ended (the last time)
    # How an outcome once unknown was settled: read-back | late return | operator | a later
    # attempt; None when it was never unknown or still is.
    settled_by: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    until: float | None = None  # a sleep's wake time, a wait's timeout
    value: Any = None  # the signal's data or the approval's decision a wait received
    by: str | None = None  # who sent that signal or decided
    subject: Any = None  # what an approval wait asks to approve (a tool and its arguments)
    digest: str | None = None  # the subject's digest: the approval applies to it alone
    emitted: Emitted | None = None  # the event emitted here (kind emit)
    cause: Cause | None = None  # the event that sent the signal a wait received

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(self.ended_at - self.started_at, 0.0)


@dataclass(frozen=True, slots=True)
class Superseded:
    """A compensation's give-up that an operator's retry or resolve made obsolete."""

    error: dict[str, Any]
    action: str  # retry | resolve
    by: str | None
    note: str | None


@dataclass(slots=True)
class Compensation:
    """One step's compensation, with its attempts; ``order`` is when it ran (1 = first)."""

    position: int
    name: str
    key: str
    status: str
    step: StepInfo | None = None
    attempts: list[Attempt] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)  # in history order
    skipped: str | None = None
    error: dict[str, Any] | None = None  # the give-up that stands
    child_run_id: str | None = None
    order: int = 0
    superseded: Superseded | None = None


@dataclass(frozen=True, slots=True)
class RunEvent:
    """An event of the run as a whole or of a wait, in the terms the views need."""

    seq: int
    at: float
    kind: str  # the history event's type
    position: int | None = None
    by: str | None = None  # who asked, acted, decided or sent
    reason: str | None = None
    note: str | None = None
    action: str | None = None  # an operator's action
    approval: bool = False  # a wait event of ctx.wait_for_approval()
    name: str | None = None  # the awaited signal's name
    until: float | None = None  # a timer's wake time
    value: Any = None  # a received signal's data or decision
    error: dict[str, Any] | None = None  # why compensation started
    worker: str | None = None  # the worker that resumed the run, under lease ``epoch``
    epoch: Any = None
    start_at: Any = None  # a scheduled run's start
    subject: Any = None  # what an approval wait asks to approve
    digest: str | None = None  # and its digest
    cause: Cause | None = None  # the event that started the run or sent the signal


@dataclass(slots=True)
class Timeline:
    """A run's history as the views draw it."""

    forward: list[ForwardItem]
    compensations: list[Compensation]
    events: list[RunEvent]
    compensation_reason: dict[str, Any] | None
    waiting_for: str | None
    awaits_approval: bool
    cause: Cause | None = None  # the event that started the run (a storno.on handler's)

    @property
    def steps(self) -> list[ForwardItem]:
        """The forward positions that are steps or child runs."""
        return [item for item in self.forward if item.step is not None]

    @property
    def emitted(self) -> list[Emitted]:
        """The events the run emitted, in the order it emitted them."""
        return [item.emitted for item in self.forward if item.emitted is not None]


_STEP_NOTES: dict[str, NoteKind] = {
    "step_started": "started",
    "child_started": "started",
    "outcome_unknown": "unknown",
    "step_failed": "gave_up",
    "compensation_step_started": "started",
    "compensation_attempt_failed": "failed",
    "compensation_step_completed": "completed",
    "compensation_step_skipped": "skipped",
    "compensation_step_failed": "gave_up",
}

_WAIT_KINDS = frozenset(
    {"timer_started", "timer_fired", "signal_wait_started", "signal_received", "signal_timed_out"}
)


def _note(e: HistoryEvent) -> Note | None:
    """What a step or compensation event says about its attempt, or ``None``."""
    d = e.data
    number = int(d.get("attempt", 1))
    kind: NoteKind | None = _STEP_NOTES.get(e.type)
    if e.type == "attempt_failed":
        if d.get("lost", d.get("outcome_unknown")):
            kind = "lost"
        else:
            kind = "still_unknown" if d.get("outcome_unknown") else "failed"
    elif e.type == "step_completed":
        kind = "late" if d.get("late") else "completed"
    elif e.type == "child_ended":
        kind = "child_completed" if d.get("status") == "completed" else "child_failed"
    elif e.type == "verified":
        kind = "landed" if d.get("applied") else "not_landed"
    elif e.type == "outcome_unknown" and d.get("reason") == "read-back failed":
        kind = "readback_failed"
    if kind is None:
        return None
    error = d.get("error")
    reason = d.get("reason")
    return Note(kind, number, e.at, error, None if reason is None else str(reason), e.value)


def _run_event(e: HistoryEvent) -> RunEvent:
    d = e.data
    approval = e.type in _WAIT_KINDS and is_approval_wait(d)
    by = d.get("by")
    if e.type == "signal_received":
        sender = d.get("sent_by") or d.get("by")
        by = (d.get("by") or sender) if approval else sender
    return RunEvent(
        seq=e.seq,
        at=e.at,
        kind=e.type,
        position=e.position,
        by=by,
        reason=d.get("reason"),
        note=d.get("note"),
        action=d.get("action"),
        approval=approval,
        name=d.get("name"),
        until=d.get("until"),
        value=e.value,
        error=d.get("error"),
        worker=d.get("worker"),
        epoch=d.get("epoch"),
        start_at=d.get("start_at"),
        subject=d.get("subject"),
        digest=d.get("digest"),
        cause=cause_of(d) if e.type in ("run_created", "signal_received") else None,
    )


def _attempt(items: dict[int, Attempt], number: int) -> Attempt:
    if number not in items:
        items[number] = Attempt(number)
    return items[number]


def _forward_attempt(items: dict[int, Attempt], note: Note) -> None:
    """Apply what a note says to the attempt it is about."""
    kind = note.kind
    if kind in ("child_completed", "child_failed"):
        a = _attempt(items, 1)
        a.ended_at = note.at
        a.outcome = "completed" if kind == "child_completed" else "failed"
        a.error = note.error
        return
    if kind == "gave_up":
        return
    a = _attempt(items, note.attempt)
    if kind == "started":
        a.started_at = note.at
    elif kind in ("completed", "late"):
        a.ended_at, a.outcome, a.late = note.at, "completed", kind == "late"
    elif kind in ("lost", "failed", "still_unknown"):
        a.ended_at, a.error = note.at, note.error
        a.outcome = "unknown" if kind == "lost" else "failed"
        if kind == "still_unknown":
            a.unknown_reason = "the outcome stays unknown: an earlier answer was lost"
        if (a.error or {}).get("type") == "Cancelled":
            a.outcome = "cancelled"
    elif kind == "readback_failed":
        a.readback = "failed"
        a.error = a.error or note.error
    elif kind == "unknown":
        a.outcome, a.unknown_reason = "unknown", note.reason or ""
        a.ended_at = a.ended_at or note.at
    elif kind in ("landed", "not_landed"):
        a.readback = "landed" if kind == "landed" else "not landed"
        a.readback_value = note.value


def _compensation_attempt(items: dict[int, Attempt], note: Note) -> None:
    if note.kind == "started":
        _attempt(items, note.attempt).started_at = note.at
    elif note.kind == "failed":
        a = _attempt(items, note.attempt)
        a.ended_at, a.outcome, a.error = note.at, "failed", note.error
    elif note.kind == "completed":
        open_ones = [a for a in items.values() if a.outcome == "running"]
        if open_ones:
            open_ones[-1].ended_at, open_ones[-1].outcome = note.at, "completed"


def _wait(position: int, e: HistoryEvent, approval: bool) -> ForwardItem:
    sleep = e.type == "timer_started"
    kind = "sleep" if sleep else ("approval" if approval else "signal")
    return ForwardItem(
        position=position,
        kind=kind,
        name=kind if kind != "signal" else str(e.data.get("name")),
        status="waiting",
        started_at=e.at,
        until=e.data.get("until"),
        subject=e.data.get("subject"),
        digest=e.data.get("digest"),
    )


def build_timeline(info: RunInfo) -> Timeline:
    """The timeline of a run described with its history."""
    steps = {s.position: s for s in info.steps}
    notes: dict[int, list[Note]] = {}
    waits: dict[int, ForwardItem] = {}
    comps: dict[int, Compensation] = {}
    events: list[RunEvent] = []
    reason: dict[str, Any] | None = None
    settled: dict[int, str] = {}
    gave_up_at: dict[int, dict[str, Any]] = {}  # compensations that gave up, not yet acted on
    for e in info.history:
        d, p = e.data, e.position
        note = None if p is None else _note(e)
        if note is None:
            events.append(_run_event(e))
        if e.type == "compensation_started":
            reason = d.get("error")
        elif e.type == "operator_action" and d.get("action") in ("retry", "resolve"):
            for position, error in gave_up_at.items():
                undone = comps[position]
                undone.error = None
                undone.superseded = Superseded(error, d["action"], d.get("by"), d.get("note"))
            gave_up_at.clear()
        elif e.type == "operator_action" and d.get("action") == "compensate":
            for position in d.get("not_applied", []):
                settled[int(position)] = "operator"
        if p is None:
            continue
        if e.type in ("timer_started", "signal_wait_started"):
            waits[p] = _wait(p, e, is_approval_wait(d))
        elif e.type in ("timer_fired", "signal_received", "signal_timed_out") and p in waits:
            w = waits[p]
            w.ended_at = e.at
            w.status = "timed out" if e.type == "signal_timed_out" else "done"
            if e.type == "signal_received":
                w.value, w.by, w.cause = e.value, events[-1].by, events[-1].cause
        elif note is None:
            continue
        elif e.type.startswith("compensation_"):
            c = comps.get(p)
            if c is None:
                step = steps.get(p)
                c = comps[p] = Compensation(
                    position=p,
                    name=step.name if step else str(d.get("step", "?")),
                    key=str(d.get("key", "")),
                    status="running",
                    step=step,
                    child_run_id=step.child_run_id if step else None,
                )
            c.notes.append(note)
            if note.kind == "skipped":
                c.skipped = note.reason or "skipped"
            elif note.kind == "gave_up":
                c.error, c.superseded = note.error, None
                gave_up_at[p] = c.error or {}
        else:
            notes.setdefault(p, []).append(note)
            if note.kind in ("landed", "not_landed"):
                settled[p] = "read-back"
            elif note.kind == "late":
                settled[p] = "late return"
    forward = [_step_item(s, notes.get(s.position, []), settled) for s in steps.values()]
    forward.extend(waits.values())
    # Recorded values: a model's decisions, reads, ctx.now() and the like.
    forward.extend(
        ForwardItem(
            position=e.position,
            kind="value",
            name=str(e.data.get("name", "")),
            status="recorded",
            value=e.value,
            started_at=e.at,
        )
        for e in info.history
        if e.type == "value_recorded" and e.position is not None
    )
    # Events emitted (ctx.emit), at their positions.
    for e in info.history:
        if (emitted := emitted_of(e)) is not None:
            forward.append(
                ForwardItem(
                    emitted.position,
                    "emit",
                    emitted.topic,
                    "emitted",
                    started_at=e.at,
                    value=emitted.payload,
                    emitted=emitted,
                )
            )
    forward.sort(key=lambda item: item.position)
    # Compensations run last step first: order them as they ran (comps keeps first-seen order).
    ordered = list(comps.values())
    for number, c in enumerate(ordered, 1):
        c.order = number
        if c.step is not None and c.step.compensation is not None:
            c.status = c.step.compensation.status
            c.key = c.step.compensation.idempotency_key or c.key
        by_number: dict[int, Attempt] = {}
        for note in c.notes:
            _compensation_attempt(by_number, note)
        c.attempts = sorted(by_number.values(), key=lambda a: a.number)
    waiting_for, awaits_approval = _waiting_for(info, waits)
    cause = next((e.cause for e in events if e.kind == "run_created"), None)
    return Timeline(forward, ordered, events, reason, waiting_for, awaits_approval, cause)


def _step_item(step: StepInfo, notes: list[Note], settled: dict[int, str]) -> ForwardItem:
    by_number: dict[int, Attempt] = {}
    gave_up = None
    for note in notes:
        _forward_attempt(by_number, note)
        if note.kind == "gave_up":
            gave_up = note.reason or "failed"
    was_unknown = any(n.kind in ("lost", "unknown") for n in notes)
    return ForwardItem(
        position=step.position,
        kind="child" if step.child_run_id else "step",
        name=step.name,
        status=step.status,
        step=step,
        attempts=sorted(by_number.values(), key=lambda a: a.number),
        notes=notes,
        gave_up=gave_up,
        settled_by=settled.get(step.position, "a later attempt")
        if was_unknown and not step.outcome_unknown
        else None,
        started_at=step.started_at,
        ended_at=step.ended_at,
    )


def _waiting_for(info: RunInfo, waits: dict[int, ForwardItem]) -> tuple[str | None, bool]:
    """What a waiting run waits for (``None`` when it waits for nothing shown), and whether
    that is an operator's approval."""
    open_waits = [w for w in waits.values() if w.status == "waiting"]
    if info.status is not RunStatus.WAITING or not open_waits:
        return None, False
    last = open_waits[-1]
    if last.kind == "approval":
        return "approval", True
    return (f"signal {last.name!r}" if last.kind == "signal" else "its sleep to end"), False
