"""A run's timeline as text, for ``storno show`` and ``storno demo``: its header, the forward
steps with what each attempt went through, waits and operator actions, then compensations in
the order they ran."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from storno._cli._common import ts
from storno._model import COMPENSATION_STATUSES, RunStatus
from storno._views import HistoryEvent, RunInfo

__all__ = ["render_run"]


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
    "timer_started": lambda e: f"sleep until {ts(e.data['until'])} UTC",
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
        f"  created {ts(info.created_at)}  updated {ts(info.updated_at)} (UTC)",
    ]
    if info.parent_run_id:
        lines.append(f"  child of run {info.parent_run_id}")
    if info.status is RunStatus.WAITING:
        until = f"until {ts(info.wake_at)} UTC or a message" if info.wake_at else "for a message"
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
        lines.append(f"  {ts(e.at)}  {where}{_WAIT_NOTES[e.type](e)}")
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
    elif info.status in COMPENSATION_STATUSES:
        lines += ["", "compensations: none (no compensable step had taken effect)"]
    for s, c in undone:
        state = f"{'compensation':<14} {c.status}"
        lines.append(_row(s.position, s.name, width, state, c.attempts, c.idempotency_key))
        lines += [f"      {note}" for note in back[s.position]]
    return lines
