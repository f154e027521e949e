"""The engine: runs one saga run under a lease, from its history to an end.

On every (re)start the saga body runs again from the top. Each ``ctx.step`` or recorded value
takes the next *position*; where the history already holds that position the recorded outcome
is returned instead of calling the other system again. A step's start is made durable before
its call (which registers its compensation, rule 1); its result is buffered and made durable
with the run's next write, so a step costs one commit. A crash in that window only makes the
outcome unknown, which the engine handles anyway (rule 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import random
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any, ParamSpec, Protocol, TypeVar

from storno import _faults
from storno._attempts import Calls
from storno._clock import Clock
from storno._compensation import compensate
from storno._context import SagaContext, SyncSagaContext
from storno._definitions import Saga, Step
from storno._errors import (
    ArgumentMismatchError,
    DeterminismError,
    LeaseLostError,
    StepFailedError,
    StoreError,
    error_info,
)
from storno._history import fold
from storno._model import (
    Event,
    EventType,
    InboxMessage,
    Lease,
    MessageKind,
    RetryPolicy,
    RunRecord,
    RunStatus,
)
from storno._serde import decode, describe, encode
from storno._steps import ForwardAttempts
from storno._store import NewRun, RunExistsError, RunUpdate, Store
from storno._waits import (
    Cancelled,
    Suspend,
    check_cancel,
    check_order,
)

__all__ = ["Birth", "EngineHost", "RunExecution"]

log = logging.getLogger("storno.engine")
P = ParamSpec("P")
R = TypeVar("R")
_BIRTH_DELAY = 0.05  # seconds a start waits for the body's first write before forcing it
_TOUCH_EVERY = 1.0  # seconds between updates of a running run's row (updated_at, lease)
_COMMIT_RETRY = RetryPolicy(initial_interval=0.05, maximum_interval=2.0, maximum_attempts=6)


class EngineHost(Protocol):
    """What the engine needs from the application that hosts it."""

    store: Store
    clock: Clock
    max_payload_bytes: int
    lease_seconds: float
    body_executor: Executor
    step_executor: Executor

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


class Birth:
    """A run started here that its first write creates, saving a commit; ``recorded`` is
    settled once it is durable (or failed to be). A body that has not written by then is
    made to write after :data:`_BIRTH_DELAY`, so that the start is never held up long."""

    def __init__(self, run: NewRun) -> None:
        self.run = run
        self.recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(self, error: BaseException | None = None) -> None:
        if not self.recorded.done():
            if error is None:
                self.recorded.set_result(None)
            else:
                self.recorded.set_exception(error)

    def abandon(self) -> None:
        """The execution stopped; a run never written was never created."""
        self.settle(StoreError(f"run {self.run.run_id} stopped before it was recorded"))


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
        self.lease = lease
        self.events: list[Event] = list(history)
        self.pending: list[Event] = []
        self.next_seq = history[-1].seq + 1 if history else 0
        self.recorded = fold(history)
        self.position = 0
        self.forward_only_since: str | None = None
        self.park_error: DeterminismError | None = None
        self.lease_lost = False
        self.released = False  # the run's lease was given up: it ended, parked or suspended
        self.ended: RunRecord | None = None  # the run's final state, once it ended here
        self.written_result, self.written_error = record.result, record.error
        self.touched_at = host.clock.now()  # the claim just wrote the run's row
        # The step objects the body called, with any call-site overrides: compensation uses
        # them first, and looks steps up by name only when the body did not run this time.
        self.steps_used: dict[int, Step[..., Any]] = {}
        self.in_flight: dict[int, str] = {}  # positions of steps being called right now
        self.calls = Calls(host.step_executor)
        self.commit_lock = asyncio.Lock()  # parallel branches commit one after another
        self.inbox: list[InboxMessage] = []
        self.inbox_seen = 0  # newest message loaded into self.inbox
        self.inbox_latest = record.inbox_seq  # newest message the store told us of
        self.cancel_checked = 0
        self.consumed = set(self.recorded.consumed)
        self.state: dict[str, Any] = dict(record.state or {})
        self.state_dirty = False
        self.deferred_update: RunUpdate | None = None  # goes with the next commit
        self.birth = birth
        self.create = birth.run if birth else None  # the run to insert with the first write
        if len(history) > 1 or record.epoch > 1:
            self.append(
                EventType.RUN_RESUMED,
                data={"worker": lease.owner, "epoch": lease.epoch, "status": record.status.value},
            )

    @functools.cached_property
    def rng(self) -> random.Random:
        """Jitter and ``ctx.random()``; made on first use (seeding costs two system calls)."""
        return random.Random()

    # --- the journal -------------------------------------------------------------------

    def append(
        self,
        type: EventType,
        position: int | None = None,
        data: dict[str, Any] | None = None,
        payload: str | None = None,
    ) -> None:
        event = Event(self.next_seq, type, self.host.clock.now(), position, data or {}, payload)
        self.next_seq += 1
        self.pending.append(event)
        self.events.append(event)

    async def commit(self, update: RunUpdate | None = None) -> None:
        """Make the buffered events (and the update) durable, renewing the lease."""
        async with self.commit_lock:
            deferred = self.deferred_update
            if deferred is not None:
                if update is None:
                    update = deferred
                elif update.error is None:
                    update = dataclasses.replace(update, error=deferred.error)
            failures = 0
            while True:
                events, self.pending = self.pending, []
                state = json.dumps(self.state) if self.state_dirty else None
                self.state_dirty = False
                now = self.host.clock.now()
                # Appending alone leaves the run's row untouched; the row's last change and
                # lease are refreshed a few times a second at most (the heartbeat renews too).
                touch = now - self.touched_at >= min(_TOUCH_EVERY, self.host.lease_seconds / 4)
                try:
                    latest = await self.host.store.write(
                        self.lease,
                        events,
                        update,
                        now=now,
                        lease_seconds=self.host.lease_seconds,
                        state=state,
                        touch=touch,
                        create=self.create,
                    )
                except StoreError as exc:
                    self.pending[:0] = events
                    self.state_dirty = self.state_dirty or state is not None
                    if isinstance(exc, LeaseLostError):
                        self.lease_lost = True
                        self._born(exc)
                        raise
                    failures += 1
                    if not _COMMIT_RETRY.allows_another(failures):
                        self._born(exc)
                        raise
                    log.warning("run %s: write failed, retrying: %s", self.record.run_id, exc)
                    await asyncio.sleep(_COMMIT_RETRY.delay(failures))
                    continue
                if touch or update is not None or state is not None:
                    self.touched_at = now
                if self.deferred_update is deferred:  # not one set while this write ran
                    self.deferred_update = None
                self._born(None)
                self.inbox_latest = max(self.inbox_latest, latest)
                if update is not None:  # the store keeps the last result and error written
                    self.written_result = update.result or self.written_result
                    self.written_error = update.error or self.written_error
                self.released = update is not None and update.release
                if events:
                    self.host.committed(self.record, events)
                return

    def _born(self, error: BaseException | None) -> None:
        if self.birth is not None:
            self.create = None
            self.birth.settle(error)
            self.birth = None

    async def _force_birth(self) -> None:
        """Write the run now if its body has not yet: its start is waiting for that."""
        if self.create is not None:
            with contextlib.suppress(StoreError):
                await self.commit()

    async def end(self, update: RunUpdate) -> None:
        """Record the run's end (or parking); a child tells its parent in the same write."""
        parent = self.record.parent_run_id
        if parent is not None:
            past = fold(self.events).point_of_no_return()
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
        await self.commit(update)
        self.ended = dataclasses.replace(
            self.record,
            status=update.status,
            result=self.written_result,
            error=self.written_error,
            owner=None,
            lease_expires_at=None,
        )
        if parent is not None:
            self.host.wake_workers()

    def wall_time(self) -> datetime:
        return datetime.fromtimestamp(self.host.clock.now(), UTC)

    def encode_value(self, value: Any, what: str) -> str:
        return encode(value, what=what, limit=self.host.max_payload_bytes)

    # --- driving the run ---------------------------------------------------------------

    async def execute(self) -> None:
        """Drive the run until it ends, parks, or this worker loses its lease."""
        forcing: list[asyncio.Task[None]] = []
        timer = None
        if self.birth is not None:
            timer = asyncio.get_running_loop().call_later(
                _BIRTH_DELAY, lambda: forcing.append(asyncio.create_task(self._force_birth()))
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
        try:
            await check_cancel(self)
            if self.record.deadline is not None and self.host.clock.now() > self.record.deadline:
                raise TimeoutError("the run's deadline passed before it started")
            if saga.is_async:
                result = await saga.fn(SagaContext(self), *args, **kwargs)
            else:
                loop = asyncio.get_running_loop()
                call = functools.partial(saga.fn, SyncSagaContext(self, loop), *args, **kwargs)
                result = await loop.run_in_executor(self.host.body_executor, call)
            if self.park_error is None and self.recorded.last_position >= self.position:
                what = self.recorded.kind_at(self.position)
                self.park_error = DeterminismError(
                    f"the history holds {what} at position {self.position}, which the saga "
                    f"code no longer reaches; the code changed under a running run"
                )
            result_text = self.encode_value(result, f"result of saga {saga.name!r}")
        except Suspend as suspend:
            if not self.lease_lost:
                await self._suspend(suspend.wake_at)
            return
        except Exception as exc:
            if self.lease_lost:
                return
            if self.park_error is not None:
                await self._park(error_info(self.park_error))
            else:
                await self._end_forward(exc)
            return
        if self.lease_lost:
            return
        if self.park_error is not None:
            await self._park(error_info(self.park_error))
            return
        _faults.point("run.ending", run_id=self.record.run_id, status="completed")
        self.append(EventType.RUN_COMPLETED, payload=result_text)
        await self.end(RunUpdate(RunStatus.COMPLETED, result=result_text, release=True))

    async def _suspend(self, wake_at: float | None) -> None:
        """Release the run as waiting: no worker holds it until its wake time or a message."""
        if self.park_error is not None:
            await self._park(error_info(self.park_error))
            return
        deadline = self.record.deadline
        if deadline is not None:
            wake_at = deadline if wake_at is None else min(wake_at, deadline)
        self.append(EventType.RUN_WAITING, data={"wake_at": wake_at})
        await self.commit(
            RunUpdate(RunStatus.WAITING, release=True, wake_at=wake_at, seen_inbox=self.inbox_seen)
        )
        if wake_at is not None:
            self.host.note_wake(wake_at)

    async def _end_forward(self, exc: BaseException) -> None:
        """Compensate before the point of no return; after it (or where a step past it may
        have taken effect) park the run for a person, saying what they can do (rule 5)."""
        error = error_info(exc)
        past = fold(self.events).point_of_no_return()
        if past is None:
            await compensate(self, error)
            return
        run_id, where = self.record.run_id, f"step {past.name!r} (#{past.position}, {past.kind})"
        if past.status == "completed":
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
        self.append(EventType.RUN_NEEDS_ATTENTION, data={"error": error})
        await self.end(RunUpdate(RunStatus.NEEDS_ATTENTION, error=error, release=True))

    # --- forward steps -----------------------------------------------------------------

    def take_position(self, what: str) -> int:
        if self.park_error is not None:
            raise self.park_error
        if self.lease_lost:
            raise LeaseLostError(f"run {self.record.run_id}: lease lost, {what} refused")
        position = self.position
        self.position += 1
        return position

    def mismatch(self, position: int, wanted: str) -> DeterminismError:
        self.park_error = DeterminismError(
            f"at position {position} the saga code asks for {wanted} but the history recorded "
            f"{self.recorded.kind_at(position)}; the code no longer matches this run's history"
        )
        return self.park_error

    def record_value(self, name: str, make: Callable[[], Any]) -> Any:
        position = self.take_position(f"ctx.{name}()")
        recorded = self.recorded.values.get(position)
        if recorded is not None and recorded[0] == name:
            return decode(recorded[1] or "null", what=f"recorded ctx.{name}()")
        if recorded is not None or position in self.recorded.steps:
            raise self.mismatch(position, f"ctx.{name}()")
        value = make()
        text = self.encode_value(value, f"ctx.{name}()")
        self.append(EventType.VALUE_RECORDED, position, {"name": name}, text)
        return value

    async def call_step(self, step: Step[..., Any], args: Any, kwargs: Any) -> Any:
        position = self.take_position(f"step {step.name!r}")
        await check_cancel(self)
        self.steps_used[position] = step
        step.check_runnable()
        check_order(self, step.kind, step.name, position)
        try:
            step.check_arguments(args, kwargs)
        except TypeError as exc:
            raise TypeError(f"step {step.name!r} called with bad arguments: {exc}") from None
        args_text = self.encode_value(
            {"args": list(args), "kwargs": dict(kwargs)}, f"arguments of step {step.name!r}"
        )
        state = self.recorded.steps.get(position)
        if state is None and (position in self.recorded.values or position in self.recorded.waits):
            raise self.mismatch(position, f"step {step.name!r}")
        if state is not None:
            if state.name != step.name or state.child_run_id is not None:
                raise self.mismatch(position, f"step {step.name!r}")
            if state.args != args_text:
                self.park_error = ArgumentMismatchError(
                    step.name, state.key, describe(state.args or "null"), describe(args_text)
                )
                raise self.park_error
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
        self.in_flight[position] = step.name
        try:
            attempts = ForwardAttempts(self, step, position, args, kwargs, args_text, state)
            return await attempts.run()
        finally:
            del self.in_flight[position]
