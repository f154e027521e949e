"""Compensation: undoing what a run did, latest first, when its forward path ends before the pivot.

Each compensation is retried under its own structural key and journaled attempt by attempt; one
that keeps failing makes the run a dead letter, which an operator can retry (it resumes where
it failed, with the same keys) or resolve by hand. A child run is undone by asking it to
compensate itself (or to cancel, if it has not ended) and waiting until it has.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from storno import _faults
from storno._definitions import NOT_APPLIED, UNKNOWN, CompensationContext
from storno._errors import TerminalError, error_info
from storno._history import StepState, fold
from storno._model import EventType, InboxMessage, MessageKind, RunStatus, compensation_key
from storno._serde import decode
from storno._store import RunUpdate

if TYPE_CHECKING:
    from storno._engine import RunExecution

__all__ = ["compensate"]


async def compensate(x: RunExecution, error: dict[str, Any]) -> None:
    """Undo every step that may have taken effect, latest first; end the run compensated (or
    cancelled), or as a dead letter if a compensation keeps failing."""
    if x.record.status is not RunStatus.COMPENSATING:
        x.append(EventType.COMPENSATION_STARTED, data={"error": error})
        # Made durable with the first compensation's start (or the run's end): one commit.
        x.deferred_update = RunUpdate(RunStatus.COMPENSATING, error=error)
    for state in fold(x.events).to_compensate():
        if state.compensation and state.compensation.status in ("completed", "skipped"):
            continue
        if state.child_run_id is not None:
            failure = await _undo_child(x, state, error)
        else:
            failure = await _undo_step(x, state, error)
        if failure is not None:
            x.append(EventType.RUN_COMPENSATION_FAILED, data={"error": failure})
            await x.end(RunUpdate(RunStatus.COMPENSATION_FAILED, error=failure, release=True))
            return
    cancel = fold(x.events).cancel
    status = RunStatus.COMPENSATED if cancel is None else RunStatus.CANCELLED
    _faults.point("run.ending", run_id=x.record.run_id, status=status.value)
    end = EventType.RUN_COMPENSATED if cancel is None else EventType.RUN_CANCELLED
    x.append(end, data=cancel or {})
    await x.end(RunUpdate(status, release=True))


async def _undo_child(
    x: RunExecution, state: StepState, error: dict[str, Any]
) -> dict[str, Any] | None:
    """Undo a child run: cancel it if it has not ended, compensate it if it completed."""
    child_id = state.child_run_id
    assert child_id is not None
    attempt = (state.compensation.attempts if state.compensation else 0) + 1
    data = {"step": state.name, "key": child_id, "attempt": attempt}
    x.append(EventType.COMPENSATION_STEP_STARTED, state.position, data)
    await x.commit()
    if state.status != "completed":
        message = InboxMessage(
            MessageKind.CANCEL,
            "cancel",
            message_id=f"parent-cancel-{x.record.run_id}",
            meta={"by": f"parent {x.record.run_id}", "reason": error.get("message")},
        )
        await x.host.store.deliver(child_id, message, now=x.host.clock.now())
        x.host.wake_workers()
    failure = await _wait_for_child(x, state)
    if failure is not None:
        return _give_up(x, state, child_id, failure, attempt)
    x.append(EventType.COMPENSATION_STEP_COMPLETED, state.position, {"key": child_id})
    return None


async def _undo_step(
    x: RunExecution, state: StepState, error: dict[str, Any]
) -> dict[str, Any] | None:
    """Undo one step, retrying; return an error description if it keeps failing."""
    run_id, position = x.record.run_id, state.position
    key = compensation_key(run_id, position, state.name)
    try:
        step = x.steps_used.get(position) or x.host.find_step(state.name, state.ref)
        step.check_runnable()
    except Exception as exc:
        return _give_up(x, state, key, error_info(exc))
    payload: Any = decode(state.args or "null", what=f"recorded arguments of {state.name!r}")
    args, kwargs = payload["args"], payload["kwargs"]
    result: Any = UNKNOWN
    if state.status == "completed":
        result = decode(state.result or "null", what=f"recorded result of {state.name!r}")
    else:
        found = await x.read_back(step, position, state.key, state.attempts, args, kwargs)
        if found is NOT_APPLIED:
            x.append(
                EventType.COMPENSATION_STEP_SKIPPED,
                position,
                {"key": key, "reason": "read-back found no trace of the step"},
            )
            return None
        result = found
    policy = step.compensation_retry
    comp = state.compensation
    attempts = comp.attempts if comp else 0
    # An operator's retry gives the compensation a fresh budget; numbering goes on.
    spent_before = comp.spent_before if comp else 0
    last: dict[str, Any] = (comp.error if comp else None) or {}
    compensate = step.compensate_fn
    assert compensate is not None  # check_runnable() guarantees it for compensable steps
    while True:
        used = attempts - spent_before
        if used:
            if last.get("terminal") or not policy.allows_another(used):
                return _give_up(x, state, key, last, attempts)
            await x.host.clock.sleep(policy.delay(used, x.rng))
        attempts += 1
        x.append(
            EventType.COMPENSATION_STEP_STARTED,
            position,
            {"step": state.name, "key": key, "attempt": attempts},
        )
        await x.commit()
        context: CompensationContext[Any] = CompensationContext(
            run_id, state.name, position, key, state.key, attempts, result, error
        )
        try:
            _faults.point("compensation.started", run_id=run_id, step=state.name, attempt=attempts)
            await x.call(compensate, context, args, kwargs, step.attempt_timeout)
            _faults.point("compensation.returned", run_id=run_id, step=state.name, attempt=attempts)
        except Exception as exc:
            last = error_info(exc)
            last["terminal"] = isinstance(exc, TerminalError)
            x.append(
                EventType.COMPENSATION_ATTEMPT_FAILED,
                position,
                {"key": key, "attempt": attempts, "error": last},
            )
            continue
        x.append(EventType.COMPENSATION_STEP_COMPLETED, position, {"key": key})
        return None


def _give_up(
    x: RunExecution, state: StepState, key: str, error: dict[str, Any], attempts: int = 0
) -> dict[str, Any]:
    failure = {
        "type": "CompensationFailed",
        "message": (
            f"compensation of step {state.name!r} (#{state.position}, key {key}) failed "
            f"after {attempts} attempt(s): {error.get('message', error.get('type'))}; the run "
            f"is a dead letter: fix the cause, then retry or resolve it"
        ),
        "step": state.name,
        "cause": error,
    }
    x.append(
        EventType.COMPENSATION_STEP_FAILED,
        state.position,
        {"key": key, "error": error},
    )
    return failure


async def _wait_for_child(x: RunExecution, state: StepState) -> dict[str, Any] | None:
    """Ask a completed child run to compensate and wait until it has; an error if not."""
    child_id = state.child_run_id
    assert child_id is not None
    store, clock = x.host.store, x.host.clock
    error = {
        "type": "ParentCompensating",
        "message": f"parent run {x.record.run_id} is compensating",
    }
    await store.operate(
        child_id,
        expected=[RunStatus.COMPLETED],
        status=RunStatus.COMPENSATING,
        event_type=EventType.COMPENSATION_STARTED,
        data={"error": error, "by": "parent"},
        now=clock.now(),
        claimable=True,
    )
    x.host.wake_workers()
    delay = 0.01
    while True:
        record = await store.get_run(child_id)
        if record is None or record.status in (RunStatus.COMPENSATED, RunStatus.CANCELLED):
            return None
        if record.status in (RunStatus.COMPENSATION_FAILED, RunStatus.NEEDS_ATTENTION):
            message = (record.error or {}).get("message", record.status.value)
            return {
                "type": "ChildCompensationFailed",
                "message": f"child run {child_id} ended {record.status.value}: {message}",
            }
        if record.status is RunStatus.COMPLETED:
            # It completed after it was asked to cancel (or the request above came too
            # early): ask it to compensate now.
            changed = await store.operate(
                child_id,
                expected=[RunStatus.COMPLETED],
                status=RunStatus.COMPENSATING,
                event_type=EventType.COMPENSATION_STARTED,
                data={"error": error, "by": "parent"},
                now=clock.now(),
                claimable=True,
            )
            if changed is not None:
                x.host.wake_workers()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
