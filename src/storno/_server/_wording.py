"""How the dashboard words a run's events, the events that caused them, and superseded
give-ups (the run page's and the correlation page's text).

What happened comes from :mod:`storno._timeline`, the model ``storno show`` draws too.
"""

from __future__ import annotations

from typing import Any

from storno._correlation import Cause
from storno._timeline import RunEvent, Superseded

__all__ = ["cause_text", "event_text", "superseded_text"]


def cause_text(c: Cause) -> str:
    """An event as what started a run or sent a signal: ``event ID (TOPIC) from SOURCE``."""
    source = f" from {c.source}" if c.source else ""
    return f"event {c.event_id} ({c.topic}){source}"


def event_text(e: RunEvent) -> str | None:
    """A run event as the run page lists it, or ``None`` for one it does not list."""
    if e.kind == "run_created":
        when = f", scheduled for {e.start_at}" if e.start_at else ""
        if e.cause is not None:
            handler = f", handler {e.cause.consumer}" if e.cause.consumer else ""
            return f"created by {cause_text(e.cause)}{handler}{when}"
        return f"created{when}"
    if e.kind == "run_resumed":
        return f"resumed from its history by worker {e.worker} (lease #{e.epoch})"
    if e.kind == "run_waiting":
        return "suspended: holds no worker until it is woken"
    if e.kind == "cancel_requested":
        return f"cancel requested by {e.by}: {e.reason}"
    if e.kind == "cancel_refused":
        return f"cancel by {e.by} refused: past the point of no return"
    if e.kind == "operator_action":
        note = f": {e.note}" if e.note else ""
        return f"{e.action} by {e.by}{note}"
    if e.kind == "compensation_started":
        error = e.error or {}
        return f"compensation started: {error.get('message') or error.get('type')}"
    if e.kind in ("run_completed", "run_compensated", "run_cancelled"):
        return e.kind.removeprefix("run_")
    if e.kind == "run_compensation_failed":
        return "compensation failed: the run is a dead letter"
    if e.kind == "run_needs_attention":
        return "parked: needs attention"
    if e.kind == "signal_received" and e.cause is not None:
        return f"signal “{e.name}” sent by {cause_text(e.cause)}"
    if e.kind == "approval_ignored":
        return f"a decision by {e.by} given before the run asked for one was ignored"
    return None


def _error_text(error: dict[str, Any]) -> str:
    return str(error.get("message") or error.get("type") or "failed")


def superseded_text(s: Superseded) -> str:
    """An earlier give-up, and the operator's action that made it obsolete."""
    action = "retry" if s.action == "retry" else "resolve (undone by hand)"
    note = f": {s.note}" if s.note else ""
    return f"gave up earlier ({_error_text(s.error)}); superseded by {action} by {s.by}{note}"
