"""Durable waits, fan-out and child runs: the engine's long-running half.

A run that must wait (a timer, a signal that has not come, a child that has not ended) raises
:class:`Suspend` through its body. The engine then records that the run is ``waiting``, with
the time it must wake at if any, and releases its lease: a waiting run holds no worker, task
or memory anywhere. Messages from outside (signals, cancel requests, a child's outcome) go into
the run's inbox (:mod:`storno._inbox`), which wakes it; on wake-up the body replays from the
top and consumes them at the positions where it asks for them, and the history records which
message each took.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from storno._errors import (
    ChildFailedError,
    ConfigurationError,
    SignalTimeoutError,
)
from storno._history import StepState, WaitState
from storno._model import (
    APPROVAL_WAIT,
    RESERVED_PREFIX,
    Event,
    EventType,
    MessageKind,
    RunStatus,
    StepKind,
    check_time,
)
from storno._saga import Saga
from storno._serde import decode
from storno._store import NewRun

if TYPE_CHECKING:
    from storno._engine import RunExecution

__all__ = [
    "Suspend",
    "call_child",
    "child_run_id",
    "gather",
    "sleep_until",
    "subject_digest",
    "wait_approval",
    "wait_signal",
]

T = TypeVar("T")


class Suspend(BaseException):
    """Raised through a saga body that must wait; a BaseException so user code cannot
    swallow it with ``except Exception``."""

    def __init__(self, wake_at: float | None) -> None:
        super().__init__(wake_at)
        self.wake_at = wake_at


def child_run_id(parent: str, position: int) -> str:
    """A child's run id: derived from the parent's structure, so a replay finds it again."""
    return f"{parent}/{position}"


def _wait_at(
    x: RunExecution, kind: str, name: str | None, what: str
) -> tuple[int, WaitState, bool]:
    """Take the next position for a wait; return it, its state, and whether it is new.
    ``name`` ``None`` matches a recorded wait of that kind under any name."""
    position = x.take_position(what)
    wait = x.replay.wait_at(position, kind, name, what)
    if wait is None:
        return position, WaitState(position, kind, name or "", None), True
    return position, wait, False


async def sleep_until(x: RunExecution, wake_at: float) -> None:
    position, wait, new = _wait_at(x, "sleep", "", "ctx.sleep()")
    await x.check_cancel()
    if wait.status == "done":
        return
    if new:
        wait.until = check_time(wake_at, "the end of ctx.sleep()")
        x.journal.append(EventType.TIMER_STARTED, position, {"until": wake_at})
    assert wait.until is not None
    if x.host.clock.now() >= wait.until:
        x.journal.append(EventType.TIMER_FIRED, position)
        return
    raise Suspend(wait.until)


async def wait_signal(
    x: RunExecution, name: str, timeout: float | None, has_default: bool, default: Any
) -> Any:
    if name.startswith(RESERVED_PREFIX):
        raise ConfigurationError(
            f"signal names starting with {RESERVED_PREFIX!r} are reserved for storno, got "
            f"{name!r}; use ctx.wait_for_approval() for an operator's decision"
        )
    position, wait, new = _wait_at(x, "signal", name, f"a wait for signal {name!r}")
    await x.check_cancel()
    if wait.status == "done":
        return decode(wait.payload or "null", what=f"signal {name!r}")
    if wait.status == "timed_out":
        return _timed_out(name, has_default, default)
    now = x.host.clock.now()
    if new:
        wait.until = None if timeout is None else check_time(now + timeout, "the wait's timeout")
        data = {"name": name, "until": wait.until}
        x.journal.append(EventType.SIGNAL_WAIT_STARTED, position, data)
    await x.inbox.refresh()
    message = x.inbox.take(MessageKind.SIGNAL, name)
    if message is not None:
        data = {**message.meta, "name": name, "inbox_seq": message.seq}
        data["id"] = message.message_id
        x.journal.append(EventType.SIGNAL_RECEIVED, position, data, message.payload)
        return decode(message.payload or "null", what=f"signal {name!r}")
    if wait.until is not None and now >= wait.until:
        x.journal.append(EventType.SIGNAL_TIMED_OUT, position, {"name": name})
        return _timed_out(name, has_default, default)
    raise Suspend(wait.until)


def early_approvals(x: RunExecution) -> bool:
    """Whether the run's saga declared, when the run started, that approvals may come early."""
    first = x.journal.events[0] if x.journal.events else None
    return bool(first is not None and first.data.get("early_approvals"))


def subject_digest(subject: Any) -> str:
    """The digest an approval is bound to: what it approves, as canonical JSON."""
    text = json.dumps(subject, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


async def wait_approval(
    x: RunExecution, timeout: float | None, early: bool | None, subject: Any = None
) -> Any:
    """Wait for an operator's decision (an approval message, never a signal); return its data.

    Unless the wait (or, by default, its saga) takes early approvals, a decision given before
    the wait began is not taken: it is journaled as ignored and the wait goes on waiting. A
    wait with a ``subject`` (what is to be approved: a tool and its arguments) takes only a
    decision given for that subject's digest.
    """
    what = "ctx.wait_for_approval()"
    position, wait, new = _wait_at(x, "approval", None, what)
    await x.check_cancel()
    if wait.status == "done":
        return decode(wait.payload or "null", what="approval")
    if wait.status == "timed_out":
        raise _approval_timed_out()
    if early is None:
        early = early_approvals(x)
    now = x.host.clock.now()
    if new:
        # Load every message delivered so far: those are the ones sent before this wait.
        await x.inbox.load()
        wait.until = None if timeout is None else check_time(now + timeout, "the wait's timeout")
        data = {"name": APPROVAL_WAIT, "until": wait.until, "approval": True}
        data.update(early=early, after=x.inbox.seen)
        if subject is not None:
            wait.subject, wait.digest = subject, subject_digest(subject)
            data.update(subject=subject, digest=wait.digest)
        x.journal.append(EventType.SIGNAL_WAIT_STARTED, position, data)
        if not early:
            for message in x.inbox.unconsumed(MessageKind.APPROVAL):
                note = {"ignored_seq": message.seq, "by": message.meta.get("by")}
                x.journal.append(EventType.APPROVAL_IGNORED, position, note)
    after = _approval_boundary(x, position)
    events = x.journal.events
    ignored = {e.data.get("ignored_seq") for e in events if e.type is EventType.APPROVAL_IGNORED}
    await x.inbox.refresh()
    for message in x.inbox.unconsumed(MessageKind.APPROVAL):
        if message.seq in ignored or not (early or after is None or message.seq > after):
            continue
        given: Any = decode(message.payload or "null", what="approval")
        bound = given.get("digest") if isinstance(given, dict) else None
        if wait.digest is not None and bound != wait.digest:
            # Given for another request (other arguments): it does not decide this one.
            note = {"ignored_seq": message.seq, "by": message.meta.get("by"), "digest": True}
            x.journal.append(EventType.APPROVAL_IGNORED, position, note)
            x.inbox.consume(message)
            continue
        x.inbox.consume(message)
        data = {**message.meta, "name": APPROVAL_WAIT, "inbox_seq": message.seq}
        x.journal.append(
            EventType.SIGNAL_RECEIVED, position, {**data, "approval": True}, message.payload
        )
        return given
    if wait.until is not None and now >= wait.until:
        data = {"name": APPROVAL_WAIT, "approval": True}
        x.journal.append(EventType.SIGNAL_TIMED_OUT, position, data)
        raise _approval_timed_out()
    raise Suspend(wait.until)


def _approval_boundary(x: RunExecution, position: int) -> int | None:
    """The newest inbox message sent before the approval wait at ``position`` began."""
    for event in x.journal.events:
        if event.type is EventType.SIGNAL_WAIT_STARTED and event.position == position:
            after = event.data.get("after")
            return after if isinstance(after, int) else None
    return None


def _approval_timed_out() -> SignalTimeoutError:
    return SignalTimeoutError(
        "no approval came before the wait's timeout; catch storno.SignalTimeoutError around "
        "ctx.wait_for_approval() to go on without one"
    )


def _timed_out(name: str, has_default: bool, default: Any) -> Any:
    if has_default:
        return default
    raise SignalTimeoutError(
        f"no signal {name!r} came before the wait's timeout; pass default= to "
        f"wait_for_signal() to go on without one"
    )


async def gather(calls: Iterable[Awaitable[T]]) -> list[T]:
    # Tasks start in creation order, and each takes its position before its first await.
    tasks = [asyncio.ensure_future(call) for call in calls]
    if not tasks:
        return []
    await asyncio.wait(tasks)
    suspend: Suspend | None = None
    for task in tasks:
        error = task.exception()
        if isinstance(error, Suspend):
            suspend = suspend or error
        elif error is not None:
            raise error
    if suspend is not None:
        # Every branch that could go on has gone on; the run waits for the others.
        raise suspend
    return [task.result() for task in tasks]


async def call_child(x: RunExecution, saga: Saga[..., Any], args: Any, kwargs: Any) -> Any:
    run_id = x.record.run_id
    position = x.take_position(f"child saga {saga.name!r}")
    await x.check_cancel()
    child_id = child_run_id(run_id, position)
    state = x.replay.step_at(position, f"child saga {saga.name!r}")
    if state is not None and (state.child_run_id is None or state.name != saga.name):
        raise x.replay.mismatch(position, f"child saga {saga.name!r}")
    x.replay.check_order(StepKind.COMPENSABLE, saga.name, position)
    input_text = x.encode_value(
        {"args": list(args), "kwargs": dict(kwargs)}, f"input of child saga {saga.name!r}"
    )
    if state is None:
        state = StepState(
            position,
            saga.name,
            StepKind.COMPENSABLE,
            child_id,
            None,
            input_text,
            child_run_id=child_id,
            last_attempt_open=True,
        )
        data: dict[str, Any] = {
            "saga": saga.name,
            "child": child_id,
            "kind": StepKind.COMPENSABLE.value,
        }
        x.journal.append(EventType.CHILD_STARTED, position, data, input_text)
        await x.journal.commit()
        now = x.host.clock.now()
        event_data: dict[str, Any] = {"saga": saga.name, "parent": run_id}
        if saga.early_approvals:
            event_data["early_approvals"] = True
        first = Event(0, EventType.RUN_CREATED, now, None, event_data, input_text)
        await x.host.start_child(
            NewRun(
                child_id,
                saga.name,
                input_text,
                now,
                None,
                first,
                parent_run_id=run_id,
                correlation_id=x.record.correlation_id or run_id,
            )
        )
    if state.status == "completed":
        return decode(state.result or "null", what=f"result of child {child_id}")
    if state.status == "failed":
        raise _child_failed(saga.name, position, child_id, state.error or {})
    await x.inbox.refresh()
    message = x.inbox.take(MessageKind.CHILD, child_id)
    if message is None:
        raise Suspend(None)
    status: str = message.meta.get("status", "")
    error: dict[str, Any] = message.meta.get("error") or {}
    past_pivot = bool(message.meta.get("past_pivot"))
    data = {"inbox_seq": message.seq, "status": status, "child": child_id}
    x.journal.append(
        EventType.CHILD_ENDED,
        position,
        {**data, "error": error, "past_pivot": past_pivot},
        message.payload,
    )
    state.last_attempt_open = False
    if past_pivot:
        state.kind = StepKind.NONCOMPENSABLE
        x.replay.passed_point_of_no_return(saga.name)
    if status == RunStatus.COMPLETED.value:
        state.status, state.result = "completed", message.payload
        return decode(message.payload or "null", what=f"result of child {child_id}")
    state.status = "failed"
    raise _child_failed(saga.name, position, child_id, error, status)


def _child_failed(
    saga: str, position: int, child_id: str, error: dict[str, Any], status: str = "failed"
) -> ChildFailedError:
    return ChildFailedError(saga, position, child_id, status, error.get("message", ""))
