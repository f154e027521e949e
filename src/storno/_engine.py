"""The engine: drives one saga run under a lease, from its history to an end.

:class:`RunExecution` builds a run's collaborators, each owning its state, and drives the run:
the :class:`~storno._journal.Journal` (events, commits, fencing, the deferred first write), the
:class:`~storno._replay.Replay` cursor (positions, recorded history, mismatches, the order
rule), the :class:`~storno._inbox.Inbox` (signals, approvals, cancel requests, child outcomes)
and the :class:`~storno._attempts.Calls` of the one attempt loop shared by steps, read-backs and
compensations. It implements the :class:`~storno._runtime.Runtime` a saga's context calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from storno import _faults, _waits
from storno._attempts import Calls
from storno._clock import Clock
from storno._compensation import compensate
from storno._context import SagaContext, SyncSagaContext
from storno._definitions import Step
from storno._errors import (
    ArgumentMismatchError,
    LeaseLostError,
    StepFailedError,
    error_info,
)
from storno._history import fold
from storno._inbox import Cancelled, Inbox
from storno._journal import Birth, Journal
from storno._model import (
    Event,
    EventType,
    InboxMessage,
    Lease,
    MessageKind,
    RunRecord,
    RunStatus,
    check_event_meta,
    check_topic,
)
from storno._replay import Replay
from storno._saga import Saga
from storno._serde import decode, describe, encode
from storno._steps import ForwardAttempts
from storno._store import NewRun, RunExistsError, RunUpdate, Store
from storno._traceids import traceparent

__all__ = ["EngineHost", "RunExecution"]

log = logging.getLogger("storno.engine")
T = TypeVar("T")
_NO_ARGS = '{"args":[],"kwargs":{}}'
_BIRTH_DELAY = 0.05  # seconds a start waits for the body's first write before forcing it


class EngineHost(Protocol):
    """What the engine needs from the application that hosts it."""

    store: Store
    clock: Clock
    max_payload_bytes: int
    lease_seconds: float
    body_executor: Executor
    step_executor: Executor
    calls: Calls  # for the whole process: a call may outlive the execution that made it

    def find_saga(self, name: str) -> Saga[..., Any]: ...

    def find_step(self, name: str, ref: str | None) -> Step[..., Any]: ...

    async def start_child(self, run: NewRun) -> None:
        """Create a child run (idempotent by its id) and let a worker pick it up."""

    def wake_workers(self) -> None:
        """Tell this process's workers that a run may have become claimable."""

    def note_wake(self, wake_at: float) -> None:
        """Tell this process's workers that a run suspended here wakes at ``wake_at``."""

    def committed(self, record: RunRecord, events: list[Event]) -> None:
        """Events of a run were made durable by this process (for listeners: metrics, logs)."""


class RunExecution:
    """One run driven forward (or back) by one worker under one lease."""

    def __init__(
        self,
        host: EngineHost,
        record: RunRecord,
        lease: Lease,
        history: list[Event],
        birth: Birth | None = None,
    ):
        self.host = host
        self.record = record
        recorded = fold(history)
        self.inbox = Inbox(
            host.store, record.run_id, latest=record.inbox_seq, consumed=recorded.consumed
        )
        self.journal = Journal(host, record, lease, history, self.inbox, birth)
        self.replay = Replay(recorded)
        self.calls = host.calls
        self.ended: RunRecord | None = None  # the run's final state, once it ended here
        if len(history) > 1 or record.epoch > 1:
            self.journal.append(
                EventType.RUN_RESUMED,
                data={"worker": lease.owner, "epoch": lease.epoch, "status": record.status.value},
            )

    @functools.cached_property
    def rng(self) -> random.Random:
        """Jitter and ``ctx.random()``; made on first use (seeding costs two system calls)."""
        return random.Random()

    def jitter_rng(self) -> random.Random:
        """The random source of retry jitter, made when a retry first needs it."""
        return self.rng

    @property
    def holds_lease(self) -> bool:
        """Whether this execution still has a lease to renew: written, not given up."""
        return not (self.journal.released or self.journal.unborn)

    # --- the runtime a saga context calls --------------------------------------------

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def now(self) -> float:
        return self.host.clock.now()

    def wall_time(self) -> datetime:
        return datetime.fromtimestamp(self.host.clock.now(), UTC)

    def random(self) -> float:
        return self.rng.random()

    async def call_child(self, saga: Saga[..., Any], args: Any, kwargs: Any) -> Any:
        return await _waits.call_child(self, saga, args, kwargs)

    async def gather(self, calls: Iterable[Awaitable[T]]) -> list[T]:
        return await _waits.gather(calls)

    async def sleep_until(self, wake_at: float) -> None:
        await _waits.sleep_until(self, wake_at)

    async def wait_signal(
        self, name: str, timeout: float | None, has_default: bool, default: Any
    ) -> Any:
        return await _waits.wait_signal(self, name, timeout, has_default, default)

    async def wait_approval(
        self, timeout: float | None, early: bool | None, subject: Any = None
    ) -> Any:
        return await _waits.wait_approval(self, timeout, early, subject)

    def publish(self, name: str, value: Any) -> None:
        text = self.encode_value(value, f"published value {name!r}")
        self.journal.publish(name, decode(text))

    def record_value(self, name: str, make: Callable[[], Any]) -> Any:
        position = self.take_position(f"ctx.{name}()")
        found, text = self.replay.value_at(position, name)
        if found:
            return decode(text or "null", what=f"recorded ctx.{name}()")
        value = make()
        text = self.encode_value(value, f"ctx.{name}()")
        self.journal.append(EventType.VALUE_RECORDED, position, {"name": name}, text)
        return value

    def emit(self, topic: str, payload: Any, key: str | None, headers: Any) -> str:
        check_topic(topic)
        own = check_event_meta(key, headers)
        position = self.take_position(f"ctx.emit({topic!r})")
        run_id = self.record.run_id
        event_id = f"{run_id}/{position}"
        found, recorded = self.replay.value_at(position, "emit")
        if found:
            if recorded != topic:
                raise self.replay.mismatch(position, f"ctx.emit({topic!r})")
            return event_id
        text = self.encode_value(payload, f"payload of event {topic!r}")
        cause = self.journal.events[0].data.get("cause") or {} if self.journal.events else {}
        data = {
            "topic": topic,
            "event_id": event_id,
            "key": key,
            "correlation_id": self.record.correlation_id or run_id,
            "causation_id": cause.get("event_id"),
            "traceparent": traceparent(run_id, "emit", position),
            "headers": own,
        }
        self.journal.append(EventType.EVENT_EMITTED, position, data, text)
        return event_id

    async def record_call(self, name: str, make: Callable[[], Any]) -> Any:
        position = self.take_position(f"ctx.record({name!r})")
        found, text = self.replay.value_at(position, name)
        if found:
            return decode(text or "null", what=f"recorded {name!r}")
        await self.check_cancel()
        value = make()
        if inspect.isawaitable(value):
            value = await value
        text = self.encode_value(value, f"recorded {name!r}")
        self.journal.append(EventType.VALUE_RECORDED, position, {"name": name}, text)
        await self.journal.commit()  # durable before anything acts on it
        return decode(text)

    async def call_step(self, step: Step[..., Any], args: Any, kwargs: Any) -> Any:
        position = self.take_position(f"step {step.name!r}")
        await self.check_cancel()
        replay = self.replay
        replay.use(position, step)
        step.check_runnable()
        replay.check_order(step.kind, step.name, position)
        try:
            step.check_arguments(args, kwargs)
        except TypeError as exc:
            raise TypeError(f"step {step.name!r} called with bad arguments: {exc}") from None
        if args or kwargs:
            args_text = self.encode_value(
                {"args": list(args), "kwargs": dict(kwargs)}, f"arguments of step {step.name!r}"
            )
        else:
            args_text = _NO_ARGS  # what encoding no arguments gives, without the encoding
        state = replay.step_at(position, f"step {step.name!r}")
        if state is not None:
            if state.name != step.name or state.child_run_id is not None:
                raise replay.mismatch(position, f"step {step.name!r}")
            if state.args != args_text:
                raise replay.park(
                    ArgumentMismatchError(
                        step.name, state.key, describe(state.args or "null"), describe(args_text)
                    )
                )
            if state.status == "completed":
                return decode(state.result or "null", what=f"recorded result of {step.name!r}")
            if state.status == "failed":
                cause = (state.error or {}).get("cause") or state.error or {}
                raise StepFailedError(
                    step.name,
                    position,
                    "recorded failure",
                    cause.get("type", "Error"),
                    cause.get("message", ""),
                    state.outcome_unknown,
                )
        replay.calling(position, step.name)
        try:
            attempts = ForwardAttempts(self, step, position, args, kwargs, args_text, state)
            return await attempts.run()
        finally:
            replay.called(position)

    # --- what the engine's parts share ------------------------------------------------

    def take_position(self, what: str) -> int:
        if self.journal.lease_lost:
            raise LeaseLostError(f"run {self.record.run_id}: lease lost, {what} refused")
        return self.replay.take()

    def encode_value(self, value: Any, what: str) -> str:
        return encode(value, what=what, limit=self.host.max_payload_bytes)

    async def check_cancel(self) -> None:
        """Honour a cancel request that arrived: compensate before the pivot, else refuse."""
        for message in await self.inbox.cancels():
            self.inbox.consume(message)
            by, reason = message.meta.get("by"), message.meta.get("reason")
            data = {"inbox_seq": message.seq, "by": by, "reason": reason}
            past = fold(self.journal.events).point_of_no_return()
            if past is not None:
                data["step"] = past.name
                self.journal.append(EventType.CANCEL_REFUSED, data=data)
                continue
            self.journal.append(EventType.CANCEL_REQUESTED, data=data)
            raise Cancelled(by, reason)

    async def end(self, update: RunUpdate) -> None:
        """Record the run's end (or parking); a child tells its parent in the same write."""
        parent = self.record.parent_run_id
        if parent is not None:
            past = fold(self.journal.events).point_of_no_return()
            message = InboxMessage(
                MessageKind.CHILD,
                self.record.run_id,
                update.result,
                meta={
                    "status": update.status.value,
                    "error": update.error,
                    "past_pivot": past is not None,
                },
            )
            update = dataclasses.replace(update, notify_run_id=parent, notify=message)
        await self.journal.commit(update)
        self.ended = dataclasses.replace(
            self.record,
            status=update.status,
            result=self.journal.result,
            error=self.journal.error,
            owner=None,
            lease_expires_at=None,
        )
        if parent is not None:
            self.host.wake_workers()

    # --- driving the run ---------------------------------------------------------------

    async def execute(self) -> None:
        """Drive the run until it ends, parks, or this worker loses its lease."""
        forcing: list[asyncio.Task[None]] = []
        timer = None
        if self.journal.unborn:
            timer = asyncio.get_running_loop().call_later(
                _BIRTH_DELAY,
                lambda: forcing.append(asyncio.create_task(self.journal.force_birth())),
            )
        try:
            await self._execute()
        finally:
            if timer is not None:
                timer.cancel()
            for task in forcing:
                await task

    async def _execute(self) -> None:
        try:
            if self.record.status is RunStatus.COMPENSATING:
                await compensate(self, self.record.error or {"message": "compensation resumed"})
            else:
                await self._forward()
        except Cancelled as cancel:
            await compensate(
                self,
                {"type": "Cancelled", "message": str(cancel), "by": cancel.by},
            )
        except RunExistsError:
            pass  # started twice under one id: the start hands out the existing run
        except LeaseLostError:
            log.warning("run %s: lease lost to another worker; stopping", self.record.run_id)

    async def _forward(self) -> None:
        saga = self.host.find_saga(self.record.saga)
        payload: Any = decode(self.record.input, what=f"input of run {self.record.run_id}")
        args, kwargs = payload["args"], payload["kwargs"]
        replay, journal = self.replay, self.journal
        try:
            await self.check_cancel()
            if self.record.deadline is not None and self.host.clock.now() > self.record.deadline:
                raise TimeoutError("the run's deadline passed before it started")
            if saga.is_async:
                result = await saga.fn(SagaContext(self), *args, **kwargs)
            else:
                loop = asyncio.get_running_loop()
                call = functools.partial(saga.fn, SyncSagaContext(self, loop), *args, **kwargs)
                result = await loop.run_in_executor(self.host.body_executor, call)
            replay.unreached()
            result_text = self.encode_value(result, f"result of saga {saga.name!r}")
        except _waits.Suspend as suspend:
            if not journal.lease_lost:
                await self._suspend(suspend.wake_at)
            return
        except Exception as exc:
            if journal.lease_lost:
                return
            if replay.park_error is not None:
                await self._park(error_info(replay.park_error))
            else:
                await self._end_forward(exc)
            return
        if journal.lease_lost:
            return
        if replay.park_error is not None:
            await self._park(error_info(replay.park_error))
            return
        _faults.point("run.ending", run_id=self.record.run_id, status="completed")
        journal.append(EventType.RUN_COMPLETED, payload=result_text)
        await self.end(RunUpdate(RunStatus.COMPLETED, result=result_text, release=True))

    async def _suspend(self, wake_at: float | None) -> None:
        """Release the run as waiting: no worker holds it until its wake time or a message."""
        if self.replay.park_error is not None:
            await self._park(error_info(self.replay.park_error))
            return
        deadline = self.record.deadline
        if deadline is not None:
            wake_at = deadline if wake_at is None else min(wake_at, deadline)
        self.journal.append(EventType.RUN_WAITING, data={"wake_at": wake_at})
        await self.journal.commit(
            RunUpdate(RunStatus.WAITING, release=True, wake_at=wake_at, seen_inbox=self.inbox.seen)
        )
        if wake_at is not None:
            self.host.note_wake(wake_at)

    async def _end_forward(self, exc: BaseException) -> None:
        """Compensate before the point of no return; after it (or where a step past it may
        have taken effect) park the run for a person, saying what they can do (rule 5)."""
        error = error_info(exc)
        history = fold(self.journal.events)
        past = history.point_of_no_return()
        if past is None:
            await compensate(self, error)
            return
        # Name the step a person must check: the first one past the point of no return whose
        # outcome is unknown, else the point of no return itself.
        pivot = past
        past = next(
            (
                s
                for s in sorted(history.steps.values(), key=lambda s: s.position)
                if s.position >= pivot.position and s.status != "completed" and s.may_have_applied
            ),
            pivot,
        )
        run_id, where = self.record.run_id, f"step {past.name!r} (#{past.position}, {past.kind})"
        if past is not pivot:
            error["reason"] = "outcome_unknown"
            error["message"] = (
                f"{where} may have taken effect: its outcome is unknown ({error['message']}). "
                f"The run is past its point of no return (step {pivot.name!r} completed), so it "
                f"only goes forward: check the other system, then `storno retry {run_id}` to "
                f"try it again under the same key, or `storno resolve {run_id} --as completed "
                f"--note ...` once it is done by hand"
            )
        elif past.status == "completed":
            error["reason"] = "failed_after_pivot"
            error["message"] = (
                f"the forward path ended after the point of no return ({where}), so nothing "
                f"is compensated and the run needs a person: {error['message']}. Fix the "
                f"cause, then `storno retry {run_id}` to go forward, or `storno resolve "
                f"{run_id} --as completed --note ...` once it is finished by hand"
            )
        else:
            error["reason"] = "outcome_unknown"
            error["message"] = (
                f"{where} may have passed the point of no return: its outcome is unknown "
                f"({error['message']}), and storno will not compensate as if it had not. "
                f"Check the other system, then `storno retry {run_id}` to try it again under "
                f"the same key, `storno compensate {run_id} --outcome {past.name}=not_applied` "
                f"if it did not take effect, or `storno resolve {run_id} --note ...`"
            )
        error["step"], error["position"] = past.name, past.position
        await self._park(error)

    async def _park(self, error: dict[str, Any]) -> None:
        if error.get("type") in ("storno.DeterminismError", "storno.ArgumentMismatchError"):
            run_id = self.record.run_id
            error["reason"] = "nondeterminism"
            error["message"] += (
                f". Deploy code that matches the history, then `storno retry {run_id}`, or "
                f"`storno resolve {run_id} --note ...`"
            )
        self.journal.append(EventType.RUN_NEEDS_ATTENTION, data={"error": error})
        await self.end(RunUpdate(RunStatus.NEEDS_ATTENTION, error=error, release=True))
