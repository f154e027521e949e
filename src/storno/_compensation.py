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
from storno._attempts import Budget, Failure, classify, run_attempts
from storno._definitions import NOT_APPLIED, UNKNOWN, CompensationContext, Step
from storno._errors import error_info
from storno._history import StepState, fold
from storno._model import EventType, InboxMessage, MessageKind, RunStatus, compensation_key
from storno._serde import decode
from storno._steps import read_back
from storno._store import RunUpdate

if TYPE_CHECKING:
    from storno._engine import RunExecution

__all__ = ["compensate"]


async def compensate(x: RunExecution, error: dict[str, Any]) -> None:
    """Undo every step that may have taken effect, latest first; end the run compensated (or
    cancelled), or as a dead letter if a compensation keeps failing."""
    if x.record.status is not RunStatus.COMPENSATING:
        x.journal.append(EventType.COMPENSATION_STARTED, data={"error": error})
        # Made durable with the first compensation's start (or the run's end): one commit.
        x.journal.defer(RunUpdate(RunStatus.COMPENSATING, error=error))
    for state in fold(x.journal.events).to_compensate():
        if state.compensation and state.compensation.status in ("completed", "skipped"):
            continue
        if state.child_run_id is not None:
            failure = await _undo_child(x, state, error)
        else:
            failure = await _undo_step(x, state, error)
        if failure is not None:
            x.journal.append(EventType.RUN_COMPENSATION_FAILED, data={"error": failure})
            await x.end(RunUpdate(RunStatus.COMPENSATION_FAILED, error=failure, release=True))
            return
    cancel = fold(x.journal.events).cancel
    status = RunStatus.COMPENSATED if cancel is None else RunStatus.CANCELLED
    _faults.point("run.ending", run_id=x.record.run_id, status=status.value)
    end = EventType.RUN_COMPENSATED if cancel is None else EventType.RUN_CANCELLED
    x.journal.append(end, data=cancel or {})
    await x.end(RunUpdate(status, release=True))


async def _undo_child(
    x: RunExecution, state: StepState, error: dict[str, Any]
) -> dict[str, Any] | None:
    """Undo a child run: cancel it if it has not ended, compensate it if it completed."""
    child_id = state.child_run_id
    assert child_id is not None
    attempt = (state.compensation.attempts if state.compensation else 0) + 1
    data = {"step": state.name, "key": child_id, "attempt": attempt}
    x.journal.append(EventType.COMPENSATION_STEP_STARTED, state.position, data)
    await x.journal.commit()
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
    x.journal.append(EventType.COMPENSATION_STEP_COMPLETED, state.position, {"key": child_id})
    return None


async def _undo_step(
    x: RunExecution, state: StepState, error: dict[str, Any]
) -> dict[str, Any] | None:
    """Undo one step, retrying; return an error description if it keeps failing."""
    run_id, position = x.record.run_id, state.position
    key = compensation_key(run_id, position, state.name)
    try:
        step = x.replay.step_used(position) or x.host.find_step(state.name, state.ref)
        step.check_runnable()
    except Exception as exc:
        return _give_up(x, state, key, error_info(exc))
    payload: Any = decode(state.args or "null", what=f"recorded arguments of {state.name!r}")
    args, kwargs = payload["args"], payload["kwargs"]
    result: Any = UNKNOWN
    if state.status == "completed":
        result = decode(state.result or "null", what=f"recorded result of {state.name!r}")
    else:
        # A forward call still running in its thread may land yet: wait for it first.
        late = await x.calls.settle((x.record.run_id, position, "step"), step.thread_grace)
        found: Any = UNKNOWN
        if late is not None and late.finished and late.error is None:
            text = x.encode_value(late.value, f"result of step {state.name!r}")
            data = {"attempt": state.attempts, "late": True}
            x.journal.append(EventType.STEP_COMPLETED, position, data, text)
            found = decode(text)
        else:
            found = await read_back(x, step, position, state.attempts, args, kwargs)
        if found is NOT_APPLIED:
            x.journal.append(
                EventType.COMPENSATION_STEP_SKIPPED,
                position,
                {"key": key, "reason": "read-back found no trace of the step"},
            )
            return None
        result = found
    comp = state.compensation
    last: Failure | None = None
    if comp is not None and comp.error is not None:
        info = comp.error
        retryable = info.get("retryable", not info.get("terminal")) is not False
        last = Failure(info, retryable, False, False, info.get("retry_after"))
    plan = _CompensationAttempts(x, step, state, key, args, kwargs, result, error)
    # An operator's retry gives the compensation a fresh budget; numbering goes on.
    budget = Budget(
        step.compensation_retry,
        made=comp.attempts if comp else 0,
        spent_before=comp.spent_before if comp else 0,
    )
    try:
        await run_attempts(
            plan,
            budget,
            x.host.clock,
            x.jitter_rng,
            last=last,
            attempt_timeout=step.compensation_timeout,
        )
    except _GaveUp as gave_up:
        return gave_up.failure
    x.journal.append(EventType.COMPENSATION_STEP_COMPLETED, position, {"key": key})
    return None


class _GaveUp(Exception):
    def __init__(self, failure: dict[str, Any]) -> None:
        super().__init__(failure["message"])
        self.failure = failure


class _CompensationAttempts:
    """The attempt plan of one step's compensation (see :func:`storno._attempts.run_attempts`)."""

    def __init__(
        self,
        x: RunExecution,
        step: Step[..., Any],
        state: StepState,
        key: str,
        args: Any,
        kwargs: Any,
        result: Any,
        error: dict[str, Any],
    ) -> None:
        self.x, self.step, self.state, self.key = x, step, state, key
        self.args, self.kwargs, self.result, self.error = args, kwargs, result, error
        self.made = state.compensation.attempts if state.compensation else 0
        self.slot = (x.record.run_id, state.position, "compensation")

    async def begin(self, number: int) -> None:
        x, state = self.x, self.state
        self.made = number
        # A compensation still running in its thread since it timed out may land yet.
        await x.calls.settle(self.slot, self.step.thread_grace)
        data = {"step": state.name, "key": self.key, "attempt": number}
        x.journal.append(EventType.COMPENSATION_STEP_STARTED, state.position, data)
        await x.journal.commit()

    async def call(self, number: int, time_left: float | None) -> None:
        x, state, run_id = self.x, self.state, self.x.record.run_id
        context: CompensationContext[Any] = CompensationContext(
            run_id, state.name, state.position, self.key, state.key, number, self.result, self.error
        )
        compensate = self.step.compensate_fn
        assert compensate is not None  # check_runnable() guarantees it for compensable steps
        _faults.point("compensation.started", run_id=run_id, step=state.name, attempt=number)
        await x.calls.call(compensate, context, self.args, self.kwargs, time_left, slot=self.slot)
        _faults.point("compensation.returned", run_id=run_id, step=state.name, attempt=number)

    def classify(self, exc: Exception) -> Failure:
        return classify(exc, self.step.compensation_retry, now=self.x.host.clock.now())

    async def failed(self, number: int, failure: Failure) -> None:
        data: dict[str, Any] = {"key": self.key, "attempt": number, "error": failure.info}
        if failure.retry_after is not None:
            data["retry_after"] = failure.retry_after
        self.x.journal.append(EventType.COMPENSATION_ATTEMPT_FAILED, self.state.position, data)
        return None

    def give_up(self, reason: str, last: Failure | None) -> BaseException:
        info = last.info if last else {"type": "Error", "message": reason}
        return _GaveUp(_give_up(self.x, self.state, self.key, info, self.made))


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
    x.journal.append(
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
