"""A run's timeline as text, for ``storno show`` and ``storno demo``: its header (with the event
that started it), the forward steps with what each attempt went through and the events it
emitted, waits and operator actions, then compensations in the order they ran. What happened
comes from :mod:`storno._timeline`; this module words it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storno._cli._common import ts
from storno._correlation import Cause, Emitted, correlation_of
from storno._model import COMPENSATION_STATUSES, RunStatus
from storno._timeline import Note, RunEvent, build_timeline
from storno._views import RunInfo

__all__ = ["cause_text", "emitted_text", "render_run"]


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


def cause_text(cause: Cause) -> str:
    """An event as the cause of a run or a signal: ``event ID (TOPIC) from SOURCE``."""
    source = f" from {cause.source}" if cause.source else ""
    return f"event {cause.event_id} ({cause.topic}){source}"


def emitted_text(e: Emitted) -> str:
    """``emitted TOPIC (key K) -> event ID``."""
    key = f" (key {e.key})" if e.key is not None else ""
    return f"emitted {e.topic}{key} -> event {e.event_id}"


def _received(e: RunEvent) -> str:
    sender = f" (sent by {cause_text(e.cause)})" if e.cause is not None else ""
    return f"{_awaited(e)} received: {_short(e.value)}{sender}"


def _forward_note(n: Note) -> str | None:
    """A step's note as ``storno show`` words it (starts and plain returns go unsaid)."""
    if n.kind == "lost":
        return f"? attempt {n.attempt}: outcome unknown ({_err(n.error)})"
    if n.kind == "still_unknown":
        return (
            f"x attempt {n.attempt} failed: {_err(n.error)}; the outcome stays unknown (an "
            f"earlier answer was lost)"
        )
    if n.kind == "late":
        return f"= attempt {n.attempt} returned late, after the engine stopped waiting"
    if n.kind == "failed":
        return f"x attempt {n.attempt} failed: {_err(n.error)}"
    if n.kind in ("unknown", "readback_failed"):
        return f"? attempt {n.attempt}: outcome unknown ({n.reason})"
    if n.kind == "landed":
        return f"= read-back by key: it landed, result {_short(n.value)}; not called again"
    if n.kind == "not_landed":
        return "= read-back by key: it never landed; retried with the same key"
    if n.kind == "gave_up":
        return f"x gave up: {n.reason}"
    return None


def _compensation_note(n: Note) -> str | None:
    if n.kind == "failed":
        return f"x attempt {n.attempt} failed: {_err(n.error)}"
    if n.kind == "skipped":
        return f"- skipped: {n.reason}"
    if n.kind == "gave_up":
        return f"x gave up: {_err(n.error)}"
    return None


def _awaited(e: RunEvent) -> str:
    """What a wait's event is about: an operator's approval, or a named signal."""
    if not e.approval:
        return f"signal {e.name!r}"
    if e.subject is None:
        return "approval"
    return f"approval of {_short(e.subject, 70)} (digest {e.digest})"


_EVENT_NOTES: dict[str, Callable[[RunEvent], str]] = {
    "timer_started": lambda e: f"sleep until {ts(e.until or 0.0)} UTC",
    "timer_fired": lambda e: "timer fired",
    "signal_wait_started": lambda e: f"wait for {_awaited(e)}",
    "signal_received": _received,
    "signal_timed_out": lambda e: f"{_awaited(e)} timed out",
    "approval_ignored": lambda e: f"approval by {e.by} ignored: given before the wait",
    "cancel_requested": lambda e: f"cancel by {e.by}: {e.reason}",
    "cancel_refused": lambda e: f"cancel by {e.by} refused (past the pivot)",
    "operator_action": lambda e: f"{e.action} by {e.by}: {e.note}",
}


def render_run(info: RunInfo) -> list[str]:
    """A run's timeline as text: header, forward steps, compensations in the order they ran."""
    lines = [
        f"run {info.run_id}  saga {info.saga}  status {info.status.value}",
        f"  created {ts(info.created_at)}  updated {ts(info.updated_at)} (UTC)",
    ]
    if info.parent_run_id:
        lines.append(f"  child of run {info.parent_run_id}")
    timeline = build_timeline(info)
    if timeline.cause is not None:
        by = f", handler {timeline.cause.consumer}" if timeline.cause.consumer else ""
        lines.append(f"  started by {cause_text(timeline.cause)}{by}")
    if (correlation := correlation_of(info)) is not None:
        lines.append(f"  correlation {correlation}")
    if info.status is RunStatus.WAITING:
        until = f"until {ts(info.wake_at)} UTC or a message" if info.wake_at else "for a message"
        lines.append(f"  waiting {until}")
    if info.state:
        lines.append(f"  published {_short(info.state, 90)}")
    if info.status is RunStatus.COMPLETED:
        lines.append(f"  result {_short(info.result, 90)}")
    if info.error:
        lines.append(f"  error  {info.error.get('message') or info.error.get('type')}")
    width = max([len(s.name) for s in info.steps] + [4])
    lines += ["", "forward steps"]
    if not info.steps and not timeline.emitted:
        lines.append("  (none yet)")
    for item in timeline.forward:
        if item.emitted is not None:
            lines.append(f"  #{item.position} {emitted_text(item.emitted)}")
            continue
        s = item.step
        if s is None:
            continue
        state = f"{s.kind:<14} {s.status}"
        lines.append(_row(s.position, s.name, width, state, s.attempts, s.idempotency_key))
        lines += [f"      {text}" for n in item.notes if (text := _forward_note(n)) is not None]
        if s.child_run_id:
            lines.append(f"      child run {s.child_run_id}")
        if s.status == "completed":
            lines.append(f"      -> {_short(s.result)}")
    values = [item for item in timeline.forward if item.kind == "value"]
    if values:
        lines += ["", "recorded (model decisions, reads, ctx.now() and the like)"]
    for item in values:
        lines.append(f"  #{item.position} {item.name}: {_short(item.value, 90)}")
    waits = [e for e in timeline.events if e.kind in _EVENT_NOTES]
    if waits:
        lines += ["", "waits, signals and operator actions"]
    for e in waits:
        where = f"#{e.position} " if e.position is not None else ""
        lines.append(f"  {ts(e.at)}  {where}{_EVENT_NOTES[e.kind](e)}")
    undone = [
        (c, c.step.compensation)
        for c in timeline.compensations
        if c.step is not None and c.step.compensation is not None
    ]
    if undone:
        lines += ["", "compensations (in the order they ran: last step first)"]
    elif info.status in COMPENSATION_STATUSES:
        lines += ["", "compensations: none (no compensable step had taken effect)"]
    for c, comp in undone:
        state = f"{'compensation':<14} {comp.status}"
        lines.append(_row(c.position, c.name, width, state, comp.attempts, comp.idempotency_key))
        lines += [f"      {text}" for n in c.notes if (text := _compensation_note(n)) is not None]
    return lines
