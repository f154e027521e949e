"""What an operator can do with a run that needs a person, each journaled with who and why.

A dead letter (``compensation_failed``) is retried where its compensations failed or resolved
by hand. A run in ``needs_attention`` is retried under the current code, compensated where
nothing at or after its point of no return took effect (or the operator asserts it did not),
or resolved by hand as completed or compensated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from storno._clock import Clock
from storno._errors import ConfigurationError, RunNotFoundError, RunStateError
from storno._history import Fold, fold
from storno._model import EventType, RunRecord, RunStatus, StepKind
from storno._store import Store

__all__ = ["compensate", "resolve", "retry"]


async def retry(store: Store, clock: Clock, run_id: str, *, by: str, note: str | None) -> None:
    """Retry a dead letter's failed compensations where they failed, or resume a run in
    ``needs_attention`` under the current code; the same keys, a fresh retry budget."""
    record = await _parked(store, run_id, "retry")
    target = (
        RunStatus.COMPENSATING
        if record.status is RunStatus.COMPENSATION_FAILED
        else RunStatus.RUNNING
    )
    data: dict[str, Any] = {"action": "retry", "by": by, "note": note, "from": record.status.value}
    # A parked run its deadline ended would end again at once: a person deciding that it goes
    # on lifts the deadline.
    lift = record.deadline is not None and record.status is RunStatus.NEEDS_ATTENTION
    if lift:
        data["deadline_lifted"] = record.deadline
    await _operate(
        store, clock, run_id, record.status, target, data, claimable=True, lift_deadline=lift
    )


async def compensate(
    store: Store,
    clock: Clock,
    run_id: str,
    *,
    by: str,
    note: str | None,
    not_applied: Sequence[str | int],
) -> None:
    """Compensate a run in ``needs_attention`` now.

    Allowed only where no step at or after its point of no return took effect or may
    have: ``not_applied`` names steps (by name or position) whose outcome is unknown
    and that the operator found, in the other system, did not take effect. That
    assertion is journaled with the action.
    """
    record = await _parked(store, run_id, "compensate")
    if record.status is not RunStatus.NEEDS_ATTENTION:
        raise RunStateError(
            f"run {run_id} is {record.status.value}; only a run in needs_attention can "
            f"be compensated by an operator (a dead letter is retried or resolved)"
        )
    history = fold(await store.history(run_id))
    positions = _asserted_positions(run_id, history, not_applied)
    forward_only = [
        s for s in sorted(history.steps.values(), key=lambda s: s.position)
        if s.kind is not StepKind.COMPENSABLE
    ]  # fmt: skip
    for state in forward_only:
        if state.status == "completed":
            raise RunStateError(
                f"run {run_id} cannot be compensated: step {state.name!r} "
                f"(#{state.position}, {state.kind}) completed, so the run is past its "
                f"point of no return and must go forward; retry it, or resolve it by hand"
            )
        if state.may_have_applied and state.position not in positions:
            raise RunStateError(
                f"run {run_id} cannot be compensated: step {state.name!r} "
                f"(#{state.position}, {state.kind}) may have taken effect (its outcome "
                f"is unknown). Check the other system; if it did not take effect, say so "
                f"with `--outcome {state.name}=not_applied` (not_applied="
                f"[{state.name!r}]), else retry or resolve the run"
            )
    data = {
        "action": "compensate",
        "by": by,
        "note": note,
        "from": record.status.value,
        "not_applied": sorted(positions),
    }
    # The park's error ("will not compensate as if ...") stops being true: say who decided.
    why = {"type": "OperatorCompensate", "message": f"compensated by {by}: {note or 'no note'}"}
    await _operate(
        store, clock, run_id, record.status, RunStatus.COMPENSATING, data, claimable=True, error=why
    )


async def resolve(
    store: Store, clock: Clock, run_id: str, *, by: str, note: str, outcome: str | None
) -> None:
    """Close a run that needs a person as handled by hand; the note says what was done.

    A dead letter ends ``compensated``. A run in ``needs_attention`` ends as
    ``outcome`` says: ``"completed"`` (finished by hand) or ``"compensated"`` (undone by
    hand); it must be given there.
    """
    if not note:
        raise ConfigurationError("resolve needs a note saying what was done by hand")
    record = await _parked(store, run_id, "resolve")
    ends = {"completed": RunStatus.COMPLETED, "compensated": RunStatus.COMPENSATED}
    if record.status is RunStatus.COMPENSATION_FAILED:
        if outcome not in (None, "compensated"):
            raise ConfigurationError(
                f"run {run_id} is a dead letter: resolving it means it was compensated by "
                f"hand, not {outcome!r}"
            )
        outcome = "compensated"
    elif outcome not in ends:
        raise ConfigurationError(
            f"run {run_id} needs attention: say how it ended by hand, outcome='completed' "
            f"(finished) or outcome='compensated' (undone) (`--as completed` on the CLI); "
            f"got {outcome!r}"
        )
    data = {
        "action": "resolve",
        "by": by,
        "note": note,
        "from": record.status.value,
        "as": outcome,
    }
    await _operate(store, clock, run_id, record.status, ends[outcome], data, claimable=False)


async def _parked(store: Store, run_id: str, action: str) -> RunRecord:
    """The run, if it is waiting for a person; else a RunStateError naming its state."""
    record = await store.get_run(run_id)
    if record is None:
        raise RunNotFoundError(run_id)
    if record.status not in (RunStatus.COMPENSATION_FAILED, RunStatus.NEEDS_ATTENTION):
        raise RunStateError(
            f"run {run_id} is {record.status.value}; only a run that needs a person "
            f"(compensation_failed or needs_attention) can be given {action}"
        )
    return record


async def _operate(
    store: Store,
    clock: Clock,
    run_id: str,
    current: RunStatus,
    status: RunStatus,
    data: dict[str, Any],
    *,
    claimable: bool,
    lift_deadline: bool = False,
    error: dict[str, Any] | None = None,
) -> None:
    cause = error
    if current is RunStatus.COMPENSATION_FAILED:
        # The dead letter's error stops being true once an operator acts: the run shows
        # again why it compensated (the failure stays in its history).
        started = [
            e for e in await store.history(run_id) if e.type is EventType.COMPENSATION_STARTED
        ]
        cause = started[-1].data.get("error") if started else None
    changed = await store.operate(
        run_id,
        expected=[current],
        status=status,
        event_type=EventType.OPERATOR_ACTION,
        data=data,
        now=clock.now(),
        claimable=claimable,
        error=cause if isinstance(cause, dict) else None,
        lift_deadline=lift_deadline,
    )
    if changed is None:
        record = await store.get_run(run_id)
        state = record.status.value if record else "gone"
        raise RunStateError(
            f"run {run_id} changed while the {data['action']} was given: it is now "
            f"{state}, not {current.value}; look again and retry the action"
        )


def _asserted_positions(run_id: str, history: Fold, steps: Sequence[str | int]) -> set[int]:
    """Positions of the steps an operator says did not take effect; each must be a step of
    the run whose outcome is not known to have been applied."""
    positions: set[int] = set()
    for item in steps:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            found = [history.steps[int(item)]] if int(item) in history.steps else []
        else:
            found = [s for s in history.steps.values() if s.name == item]
        if not found:
            names = ", ".join(sorted({s.name for s in history.steps.values()})) or "none"
            raise ConfigurationError(f"run {run_id} has no step {item!r} (its steps: {names})")
        if len(found) > 1:
            where = ", ".join(f"#{s.position}" for s in found)
            raise ConfigurationError(
                f"run {run_id} calls step {item!r} more than once ({where}): name it by position"
            )
        state = found[0]
        if state.status == "completed":
            raise ConfigurationError(
                f"step {state.name!r} (#{state.position}) of run {run_id} is recorded as "
                f"completed: it cannot be declared not applied"
            )
        positions.add(state.position)
    return positions
