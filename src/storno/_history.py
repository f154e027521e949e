"""Folding a run's append-only history into the state of each step.

The engine uses the fold to replay and to decide what to compensate; ``storno show`` and the
demo use it to draw the timeline. Both read the same events the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storno._model import LEGACY_APPROVAL_SIGNAL, Event, EventType, StepKind

__all__ = ["CompensationState", "Fold", "StepState", "WaitState", "fold", "is_approval_wait"]


@dataclass(slots=True)
class CompensationState:
    """What happened to one step's compensation."""

    key: str
    status: str = "pending"  # pending | running | completed | skipped | failed
    attempts: int = 0
    error: dict[str, Any] | None = None
    started_at: float | None = None
    ended_at: float | None = None
    spent_before: int = 0  # attempts made before an operator's retry reset the budget


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
    outcome_unknown: bool = False  # an answer was lost and nothing has settled it yet
    spent_before: int = 0  # attempts made before an operator's retry reset the budget
    result: str | None = None
    error: dict[str, Any] | None = None
    started_at: float = 0.0
    ended_at: float | None = None
    ended_seq: int | None = None
    verified: list[bool] = field(default_factory=list)
    compensation: CompensationState | None = None
    child_run_id: str | None = None  # the position started a child run, not a step call

    @property
    def may_have_applied(self) -> bool:
        """Completed, or ended with its outcome unknown: a compensation may be owed."""
        return self.status == "completed" or (
            self.status in ("failed", "running")
            and (self.outcome_unknown or self.last_attempt_open)
        )


@dataclass(slots=True)
class WaitState:
    """A durable wait at one position: a timer (``sleep``) or a signal wait."""

    position: int
    kind: str  # sleep | signal | approval
    name: str  # the signal's name; "" for a timer
    until: float | None  # when the timer fires or the signal wait times out
    status: str = "waiting"  # waiting | done | timed_out
    payload: str | None = None  # the received signal's payload
    meta: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    subject: Any = None  # what an approval wait asks to approve (a tool and its arguments)
    digest: str | None = None  # the subject's digest: a decision applies to it alone
    ended_at: float | None = None


@dataclass(slots=True)
class Fold:
    """Steps and recorded values by position."""

    steps: dict[int, StepState] = field(default_factory=dict)
    values: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    waits: dict[int, WaitState] = field(default_factory=dict)
    consumed: set[int] = field(default_factory=set)  # inbox messages taken, by number
    cancel: dict[str, Any] | None = None  # who asked to cancel and why, if anyone did

    def kind_at(self, position: int) -> str | None:
        if position in self.steps:
            state = self.steps[position]
            what = "child saga" if state.child_run_id else "step"
            return f"{what} {state.name!r}"
        if position in self.values:
            return f"ctx.{self.values[position][0]}()"
        if position in self.waits:
            wait = self.waits[position]
            if wait.kind == "sleep":
                return "ctx.sleep()"
            if wait.kind == "approval":
                return "ctx.wait_for_approval()"
            return f"a wait for signal {wait.name!r}"
        return None

    @property
    def last_position(self) -> int:
        return max([-1, *self.steps, *self.values, *self.waits])

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
        d = event.data
        if "inbox_seq" in d:
            out.consumed.add(d["inbox_seq"])
        if t is EventType.CANCEL_REQUESTED:
            out.cancel = {"by": d.get("by"), "reason": d.get("reason")}
        if t is EventType.OPERATOR_ACTION:
            _operator_action(out, d)
        if p is None:
            continue
        if t is EventType.VALUE_RECORDED:
            out.values[p] = (d["name"], event.payload)
            continue
        if t is EventType.EVENT_EMITTED:  # the topic stands in for the value: replay checks it
            out.values[p] = ("emit", d["topic"])
            continue
        if t in _WAIT_EVENTS:
            _fold_wait(out, event)
            continue
        if t is EventType.CHILD_STARTED:
            out.steps[p] = StepState(
                position=p,
                name=d["saga"],
                kind=StepKind(d["kind"]),
                key=d["child"],
                ref=None,
                args=event.payload,
                attempts=1,
                last_attempt_open=True,
                started_at=event.at,
                child_run_id=d["child"],
            )
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
        if t is EventType.CHILD_ENDED:
            state.last_attempt_open = False
            state.ended_at, state.ended_seq = event.at, event.seq
            if d["status"] == "completed":
                state.status, state.result = "completed", event.payload
            else:
                state.status, state.error = "failed", d.get("error")
            if d.get("past_pivot"):
                state.kind = StepKind.NONCOMPENSABLE
        elif t is EventType.STEP_COMPLETED:
            state.status, state.result = "completed", event.payload
            state.last_attempt_open = state.outcome_unknown = False
            state.ended_at, state.ended_seq = event.at, event.seq
        elif t is EventType.ATTEMPT_FAILED:
            # The engine records the step's outcome after the attempt ("lost" marks such
            # events). Older histories recorded each attempt alone: there only a declared
            # proof settles an earlier lost answer.
            state.last_attempt_open = False
            if "lost" in d:
                state.outcome_unknown = bool(d.get("outcome_unknown"))
            else:
                state.outcome_unknown = bool(d.get("outcome_unknown")) or (
                    state.outcome_unknown and not d.get("not_applied")
                )
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


_WAIT_EVENTS = frozenset(
    {
        EventType.TIMER_STARTED,
        EventType.TIMER_FIRED,
        EventType.SIGNAL_WAIT_STARTED,
        EventType.SIGNAL_RECEIVED,
        EventType.SIGNAL_TIMED_OUT,
    }
)


def _fold_wait(out: Fold, event: Event) -> None:
    t, d, p = event.type, event.data, event.position
    assert p is not None
    if t is EventType.TIMER_STARTED:
        out.waits[p] = WaitState(p, "sleep", "", d["until"], started_at=event.at)
        return
    if t is EventType.SIGNAL_WAIT_STARTED:
        kind = "approval" if is_approval_wait(d) else "signal"
        out.waits[p] = WaitState(
            p,
            kind,
            d["name"],
            d.get("until"),
            started_at=event.at,
            subject=d.get("subject"),
            digest=d.get("digest"),
        )
        return
    wait = out.waits.get(p)
    if wait is None:
        return
    wait.ended_at = event.at
    if t is EventType.SIGNAL_TIMED_OUT:
        wait.status = "timed_out"
    else:
        wait.status, wait.payload, wait.meta = "done", event.payload, d


def is_approval_wait(data: dict[str, Any]) -> bool:
    """Whether a wait event is ``ctx.wait_for_approval()``'s (older histories named it)."""
    return bool(data.get("approval")) or data.get("name") == LEGACY_APPROVAL_SIGNAL


def _operator_action(out: Fold, d: dict[str, Any]) -> None:
    """An operator's retry or compensate changes what the engine does next."""
    action = d.get("action")
    if action == "retry":
        # A dead letter's failed compensations run again where they failed; a parked run's
        # steps that ended its forward path are attempted again (same keys, a fresh budget).
        forward_only = min(
            (s.position for s in out.steps.values() if s.kind is not StepKind.COMPENSABLE),
            default=None,
        )
        for state in out.steps.values():
            comp = state.compensation
            if comp is not None and comp.status == "failed":
                comp.status, comp.error, comp.spent_before = "pending", None, comp.attempts
            elif (
                d.get("from") == "needs_attention"
                and state.status == "failed"
                and state.child_run_id is None
                and (
                    state.outcome_unknown
                    or (forward_only is not None and state.position >= forward_only)
                )
            ):
                state.status, state.spent_before = "running", state.attempts
    elif action == "compensate":
        # The operator checked the other system by hand: these steps did not take effect.
        for position in d.get("not_applied", []):
            asserted = out.steps.get(int(position))
            if asserted is not None and asserted.status != "completed":
                asserted.status, asserted.outcome_unknown = "failed", False
                asserted.last_attempt_open = False


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
