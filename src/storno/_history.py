"""Folding a run's append-only history into the state of each step.

The engine uses the fold to replay and to decide what to compensate; ``storno show`` and the
demo use it to draw the timeline. Both read the same events the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storno._model import Event, EventType, StepKind

__all__ = ["CompensationState", "Fold", "StepState", "fold"]


@dataclass(slots=True)
class CompensationState:
    """What happened to one step's compensation."""

    key: str
    status: str = "pending"  # pending | running | completed | skipped | failed
    attempts: int = 0
    error: dict[str, Any] | None = None
    started_at: float | None = None
    ended_at: float | None = None


@dataclass(slots=True)
class StepState:
    """What happened to one forward step, attempt by attempt."""

    position: int
    name: str
    kind: StepKind
    key: str
    ref: str | None
    args: str | None
    status: str = "running"  # running | completed | failed
    attempts: int = 0
    last_attempt_open: bool = False  # started, and no outcome recorded for it yet
    outcome_unknown: bool = False  # the final outcome could not be established
    result: str | None = None
    error: dict[str, Any] | None = None
    started_at: float = 0.0
    ended_at: float | None = None
    ended_seq: int | None = None
    verified: list[bool] = field(default_factory=list)
    compensation: CompensationState | None = None

    @property
    def may_have_applied(self) -> bool:
        """Completed, or ended with its outcome unknown: a compensation may be owed."""
        return self.status == "completed" or (
            self.status in ("failed", "running")
            and (self.outcome_unknown or self.last_attempt_open)
        )


@dataclass(slots=True)
class Fold:
    """Steps and recorded values by position."""

    steps: dict[int, StepState] = field(default_factory=dict)
    values: dict[int, tuple[str, str | None]] = field(default_factory=dict)

    def kind_at(self, position: int) -> str | None:
        if position in self.steps:
            return f"step {self.steps[position].name!r}"
        if position in self.values:
            return f"ctx.{self.values[position][0]}()"
        return None

    @property
    def last_position(self) -> int:
        return max([-1, *self.steps, *self.values])

    def to_compensate(self) -> list[StepState]:
        """Compensable steps that may have applied, latest-ended first."""
        owed = [
            s for s in self.steps.values() if s.kind is StepKind.COMPENSABLE and s.may_have_applied
        ]
        return sorted(owed, key=lambda s: (s.ended_seq or 1 << 62, s.position), reverse=True)

    def point_of_no_return(self) -> StepState | None:
        """The first non-compensable step that applied (or may have): no compensation after."""
        for position in sorted(self.steps):
            state = self.steps[position]
            if state.kind is not StepKind.COMPENSABLE and state.may_have_applied:
                return state
        return None


def fold(events: list[Event]) -> Fold:
    """Replay the history's events into per-position step state."""
    out = Fold()
    for event in events:
        p = event.position
        t = event.type
        if p is None:
            continue
        d = event.data
        if t is EventType.VALUE_RECORDED:
            out.values[p] = (d["name"], event.payload)
            continue
        if t is EventType.STEP_STARTED:
            state = out.steps.get(p)
            if state is None:
                state = out.steps[p] = StepState(
                    position=p,
                    name=d["step"],
                    kind=StepKind(d["kind"]),
                    key=d["key"],
                    ref=d.get("ref"),
                    args=event.payload,
                    started_at=event.at,
                )
            state.attempts = d["attempt"]
            state.last_attempt_open = True
            continue
        state = out.steps.get(p)
        if state is None:
            continue
        if t is EventType.STEP_COMPLETED:
            state.status, state.result = "completed", event.payload
            state.last_attempt_open = state.outcome_unknown = False
            state.ended_at, state.ended_seq = event.at, event.seq
        elif t is EventType.ATTEMPT_FAILED:
            state.last_attempt_open = False
            state.outcome_unknown = bool(d.get("outcome_unknown"))
            state.error = d.get("error")
        elif t is EventType.OUTCOME_UNKNOWN:
            state.last_attempt_open = False
            state.outcome_unknown = True
        elif t is EventType.VERIFIED:
            state.verified.append(bool(d["applied"]))
            state.outcome_unknown = False
            if d["applied"]:
                state.status, state.result = "completed", event.payload
                state.ended_at, state.ended_seq = event.at, event.seq
        elif t is EventType.STEP_FAILED:
            state.status = "failed"
            state.last_attempt_open = False
            state.outcome_unknown = bool(d.get("outcome_unknown"))
            state.error = d.get("error")
            state.ended_at, state.ended_seq = event.at, event.seq
        else:
            _fold_compensation(state, event)
    return out


def _fold_compensation(state: StepState, event: Event) -> None:
    t, d = event.type, event.data
    comp = state.compensation
    if comp is None:
        comp = state.compensation = CompensationState(key=d.get("key", ""))
    if t is EventType.COMPENSATION_STEP_STARTED:
        comp.status, comp.attempts = "running", d["attempt"]
        comp.started_at = comp.started_at or event.at
    elif t is EventType.COMPENSATION_STEP_COMPLETED:
        comp.status, comp.ended_at = "completed", event.at
    elif t is EventType.COMPENSATION_STEP_SKIPPED:
        comp.status, comp.ended_at = "skipped", event.at
        comp.error = d.get("reason") and {"type": "skipped", "message": d["reason"]}
    elif t is EventType.COMPENSATION_ATTEMPT_FAILED:
        comp.error = d.get("error")
    elif t is EventType.COMPENSATION_STEP_FAILED:
        comp.status, comp.error, comp.ended_at = "failed", d.get("error"), event.at
