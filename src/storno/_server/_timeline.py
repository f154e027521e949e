"""A run's timeline for the dashboard, attempt by attempt, from its history.

Forward positions (steps, child runs, sleeps, signal waits) in position order, each step with
its attempts (start, end, duration, outcome, error, read-back); compensations in the order
they ran, with their attempts; and the run-level events (resumes, cancel requests, operator
actions) in time order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storno._model import LEGACY_APPROVAL_SIGNAL
from storno._views import HistoryEvent, RunInfo, StepInfo

__all__ = ["Attempt", "Compensation", "Timeline", "build_timeline"]


@dataclass(slots=True)
class Attempt:
    number: int
    started_at: float | None = None
    ended_at: float | None = None
    outcome: str = "running"  # running | completed | failed | unknown | cancelled
    error: dict[str, Any] | None = None
    unknown_reason: str | None = None
    readback: str | None = None  # landed | not landed | failed
    readback_value: Any = None

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(self.ended_at - self.started_at, 0.0)


@dataclass(slots=True)
class ForwardItem:
    position: int
    kind: str  # step | child | sleep | signal | approval
    name: str
    status: str
    step: StepInfo | None = None
    attempts: list[Attempt] = field(default_factory=list)
    gave_up: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    until: float | None = None
    value: Any = None
    note: str | None = None

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(self.ended_at - self.started_at, 0.0)


@dataclass(slots=True)
class Compensation:
    position: int
    name: str
    key: str
    status: str
    attempts: list[Attempt] = field(default_factory=list)
    skipped: str | None = None
    error: dict[str, Any] | None = None
    child_run_id: str | None = None
    order: int = 0
    superseded: str | None = None  # an earlier give-up an operator's action made obsolete


@dataclass(slots=True)
class RunEvent:
    at: float
    kind: str
    text: str


@dataclass(slots=True)
class Timeline:
    forward: list[ForwardItem]
    compensations: list[Compensation]
    events: list[RunEvent]
    compensation_reason: dict[str, Any] | None
    waiting_for: str | None
    awaits_approval: bool


def _attempt(items: dict[int, Attempt], number: int) -> Attempt:
    if number not in items:
        items[number] = Attempt(number)
    return items[number]


def _describe(e: HistoryEvent) -> str | None:
    d = e.data
    if e.type == "run_created":
        when = f", scheduled for {d['start_at']}" if d.get("start_at") else ""
        return f"created{when}"
    if e.type == "run_resumed":
        return f"resumed from its history by worker {d.get('worker')} (lease #{d.get('epoch')})"
    if e.type == "run_waiting":
        return "suspended: holds no worker until it is woken"
    if e.type == "cancel_requested":
        return f"cancel requested by {d.get('by')}: {d.get('reason')}"
    if e.type == "cancel_refused":
        return f"cancel by {d.get('by')} refused: past the point of no return"
    if e.type == "operator_action":
        note = f": {d.get('note')}" if d.get("note") else ""
        return f"{d.get('action')} by {d.get('by')}{note}"
    if e.type == "compensation_started":
        error = d.get("error") or {}
        return f"compensation started: {error.get('message') or error.get('type')}"
    if e.type in ("run_completed", "run_compensated", "run_cancelled"):
        return e.type.removeprefix("run_")
    if e.type == "run_compensation_failed":
        return "compensation failed: the run is a dead letter"
    if e.type == "run_needs_attention":
        return "parked: needs attention"
    if e.type == "approval_ignored":
        return f"a decision by {d.get('by')} given before the run asked for one was ignored"
    return None


def _error_text(error: dict[str, Any]) -> str:
    return str(error.get("message") or error.get("type") or "failed")


def build_timeline(info: RunInfo) -> Timeline:
    steps = {s.position: s for s in info.steps}
    attempts: dict[int, dict[int, Attempt]] = {}
    comp_attempts: dict[int, dict[int, Attempt]] = {}
    gave_up: dict[int, str] = {}
    waits: dict[int, ForwardItem] = {}
    comps: dict[int, Compensation] = {}
    first_comp_seq: dict[int, int] = {}
    events: list[RunEvent] = []
    reason: dict[str, Any] | None = None
    gave_up_at: dict[int, dict[str, Any]] = {}  # compensations that gave up, not yet acted on
    for e in info.history:
        d, p = e.data, e.position
        text = _describe(e)
        if text is not None:
            events.append(RunEvent(e.at, e.type, text))
        if e.type == "compensation_started":
            reason = d.get("error")
        if e.type == "operator_action" and d.get("action") in ("retry", "resolve"):
            action = "retry" if d.get("action") == "retry" else "resolve (undone by hand)"
            for position, error in gave_up_at.items():
                undone = comps[position]
                undone.error = None
                undone.superseded = (
                    f"gave up earlier ({_error_text(error)}); superseded by {action} by "
                    f"{d.get('by')}" + (f": {d.get('note')}" if d.get("note") else "")
                )
            gave_up_at.clear()
        if p is None:
            continue
        if e.type in ("step_started", "child_started"):
            a = _attempt(attempts.setdefault(p, {}), int(d.get("attempt", 1)))
            a.started_at = e.at
        elif e.type == "step_completed":
            a = _attempt(attempts.setdefault(p, {}), int(d.get("attempt", 1)))
            a.ended_at, a.outcome = e.at, "completed"
        elif e.type == "child_ended":
            a = _attempt(attempts.setdefault(p, {}), 1)
            a.ended_at = e.at
            a.outcome = "completed" if d.get("status") == "completed" else "failed"
            a.error = d.get("error")
        elif e.type == "attempt_failed":
            a = _attempt(attempts.setdefault(p, {}), int(d.get("attempt", 1)))
            a.ended_at, a.error = e.at, d.get("error")
            a.outcome = "unknown" if d.get("lost", d.get("outcome_unknown")) else "failed"
            if a.outcome == "failed" and d.get("outcome_unknown"):
                a.unknown_reason = "the outcome stays unknown: an earlier answer was lost"
            if (a.error or {}).get("type") == "Cancelled":
                a.outcome = "cancelled"
        elif e.type == "outcome_unknown":
            a = _attempt(attempts.setdefault(p, {}), int(d.get("attempt", 1)))
            if d.get("reason") == "read-back failed":
                a.readback = "failed"
                a.error = a.error or d.get("error")
            else:
                a.outcome, a.unknown_reason = "unknown", str(d.get("reason") or "")
                a.ended_at = a.ended_at or e.at
        elif e.type == "verified":
            a = _attempt(attempts.setdefault(p, {}), int(d.get("attempt", 1)))
            a.readback = "landed" if d.get("applied") else "not landed"
            a.readback_value = e.value
        elif e.type == "step_failed":
            gave_up[p] = str(d.get("reason") or "failed")
        elif e.type in ("timer_started", "signal_wait_started"):
            sleep = e.type == "timer_started"
            approval = not sleep and (
                bool(d.get("approval")) or d.get("name") == LEGACY_APPROVAL_SIGNAL
            )
            waits[p] = ForwardItem(
                position=p,
                kind="sleep" if sleep else ("approval" if approval else "signal"),
                name="sleep" if sleep else ("approval" if approval else str(d.get("name"))),
                status="waiting",
                started_at=e.at,
                until=d.get("until"),
            )
        elif e.type in ("timer_fired", "signal_received", "signal_timed_out") and p in waits:
            w = waits[p]
            w.ended_at = e.at
            w.status = "timed out" if e.type == "signal_timed_out" else "done"
            if e.type == "signal_received":
                w.value = e.value
                sender = d.get("sent_by") or d.get("by")
                if w.kind == "approval":
                    sender = d.get("by") or sender
                    w.note = f"decided by {sender}" if sender else None
                else:
                    w.note = f"sent by {sender}" if sender else None
        elif e.type.startswith("compensation_"):
            first_comp_seq.setdefault(p, e.seq)
            step = steps.get(p)
            c = comps.get(p)
            if c is None:
                c = comps[p] = Compensation(
                    position=p,
                    name=step.name if step else str(d.get("step", "?")),
                    key=str(d.get("key", "")),
                    status="running",
                    child_run_id=step.child_run_id if step else None,
                )
            by_number = comp_attempts.setdefault(p, {})
            if e.type == "compensation_step_started":
                a = _attempt(by_number, int(d.get("attempt", 1)))
                a.started_at = e.at
            elif e.type == "compensation_attempt_failed":
                a = _attempt(by_number, int(d.get("attempt", 1)))
                a.ended_at, a.outcome, a.error = e.at, "failed", d.get("error")
            elif e.type == "compensation_step_completed":
                open_ones = [a for a in by_number.values() if a.outcome == "running"]
                if open_ones:
                    open_ones[-1].ended_at, open_ones[-1].outcome = e.at, "completed"
            elif e.type == "compensation_step_skipped":
                c.skipped = str(d.get("reason") or "skipped")
            elif e.type == "compensation_step_failed":
                c.error = d.get("error")
                c.superseded = None
                gave_up_at[p] = c.error or {}
    forward: list[ForwardItem] = []
    for position, step in steps.items():
        item = ForwardItem(
            position=position,
            kind="child" if step.child_run_id else "step",
            name=step.name,
            status=step.status,
            step=step,
            attempts=sorted(attempts.get(position, {}).values(), key=lambda a: a.number),
            gave_up=gave_up.get(position),
            started_at=step.started_at,
            ended_at=step.ended_at,
        )
        forward.append(item)
    forward.extend(waits.values())
    forward.sort(key=lambda item: item.position)
    ordered = sorted(comps.values(), key=lambda c: (first_comp_seq.get(c.position, 0), c.position))
    for number, c in enumerate(ordered, 1):
        c.order = number
        step = steps.get(c.position)
        if step is not None and step.compensation is not None:
            c.status = step.compensation.status
            c.key = step.compensation.idempotency_key or c.key
        c.attempts = sorted(comp_attempts.get(c.position, {}).values(), key=lambda a: a.number)
    open_waits = [w for w in waits.values() if w.status == "waiting"]
    waiting_for = None
    awaits_approval = False
    if info.status.value == "waiting" and open_waits:
        last = open_waits[-1]
        awaits_approval = last.kind == "approval"
        waiting_for = (
            "approval"
            if awaits_approval
            else (f"signal {last.name!r}" if last.kind == "signal" else "its sleep to end")
        )
    return Timeline(forward, ordered, events, reason, waiting_for, awaits_approval)
