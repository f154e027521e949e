"""What a saga body holds: the context through which it calls steps, waits and records values.

Every call takes the run's next *position*. On replay a position the history already holds
returns what was recorded there, so the body must make the same calls in the same order.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from storno._errors import ApprovalRejectedError, ConfigurationError

if TYPE_CHECKING:
    from storno._definitions import Step
    from storno._runtime import Runtime
    from storno._saga import Saga

__all__ = ["Approval", "SagaContext", "SyncSagaContext"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Approval:
    """A person's approval, as ``ctx.wait_for_approval()`` returns it."""

    by: str | None
    note: str | None


def _seconds(duration: float | timedelta, what: str) -> float:
    value = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    if not value >= 0 or not math.isfinite(value):
        raise ConfigurationError(f"{what} must be a finite duration of 0 or more, got {duration!r}")
    return value


def _timestamp(when: datetime) -> float:
    if when.tzinfo is None:
        raise ConfigurationError(
            f"sleep_until() needs an aware datetime (with a time zone), got {when!r}; "
            f"e.g. datetime(..., tzinfo=UTC)"
        )
    return when.timestamp()


def _decide(data: Any) -> Approval:
    """An approval signal's data as an :class:`Approval`; a rejection raises."""
    decision = data if isinstance(data, dict) else {}
    if decision.get("approved"):
        return Approval(decision.get("by"), decision.get("note"))
    raise ApprovalRejectedError(decision.get("by"), decision.get("note"))


class SagaContext:
    """What an ``async`` saga body uses to call steps, wait durably and take recorded values."""

    def __init__(self, runtime: Runtime) -> None:
        self._x = runtime

    @property
    def run_id(self) -> str:
        return self._x.run_id

    async def step(self, step: Step[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a step, or return its recorded outcome when replaying."""
        result: R = await self._x.call_step(step, args, kwargs)
        return result

    async def child(self, saga: Saga[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Start ``saga`` as a child run and wait (durably) for its result.

        The child's failure is raised here as :class:`storno.ChildFailedError`; if the parent
        compensates later, a completed child is compensated too.
        """
        result: R = await self._x.call_child(saga, args, kwargs)
        return result

    async def gather(self, *calls: Awaitable[T]) -> list[T]:
        """Run several ``ctx.step(...)`` / ``ctx.child(...)`` calls concurrently.

        Positions are taken in argument order. Every call is awaited to its end; if one
        failed, the first failure (in argument order) is raised afterwards, so the steps that
        succeeded are compensated with the earlier ones, latest-completed first.
        """
        return await self._x.gather(calls)

    async def sleep(self, duration: float | timedelta) -> None:
        """Wait durably: the run holds no worker while it sleeps and survives restarts."""
        await self._x.sleep_until(self._x.now() + _seconds(duration, "sleep"))

    async def sleep_until(self, when: datetime) -> None:
        """Wait durably until an aware datetime."""
        await self._x.sleep_until(_timestamp(when))

    async def wait_for_signal(
        self,
        name: str,
        *,
        timeout: float | timedelta | None = None,
        default: Any = _MISSING,
    ) -> Any:
        """Wait durably for the next signal called ``name`` and return its data.

        Signals sent earlier are buffered and delivered in order. After ``timeout`` the wait
        returns ``default`` if one is given, else raises :class:`storno.SignalTimeoutError`.
        """
        limit = None if timeout is None else _seconds(timeout, "timeout")
        return await self._x.wait_signal(name, limit, default is not _MISSING, default)

    async def wait_for_approval(
        self,
        *,
        timeout: float | timedelta | None = None,
        early: bool | None = None,
        subject: Any = None,
    ) -> Approval:
        """Wait durably for an operator's decision (``storno approve`` / ``storno reject``,
        the API or the dashboard: never a signal or webhook).

        Returns who approved; a rejection raises :class:`storno.ApprovalRejectedError`, which
        compensates the run unless the body catches it. After ``timeout`` it raises
        :class:`storno.SignalTimeoutError`. A decision given before this wait began is not
        taken unless ``early=True`` (default: the saga's ``early_approvals``). ``subject``
        (JSON: what is to be approved, e.g. a tool and its arguments) is shown to the operator,
        and the approval is bound to its digest: it decides this request and no other.
        """
        limit = None if timeout is None else _seconds(timeout, "timeout")
        return _decide(await self._x.wait_approval(limit, early, subject))

    async def record(self, name: str, fn: Callable[[], Any]) -> Any:
        """Call ``fn()`` (sync or async) once and record its JSON result durably before it is
        returned; a replay returns the recorded value without calling again. For values that
        are not deterministic and write nothing: a model's decision, a read."""
        return await self._x.record_call(name, fn)

    def publish(self, name: str, value: Any) -> None:
        """Publish a small named value (e.g. ``phase``) that anyone can query while it runs."""
        self._x.publish(name, value)

    def emit(
        self,
        topic: str,
        payload: Any = None,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Announce an event to other services: it goes into the outbox with the run's next
        commit, and a relay sends it at least once under the returned id (``<run id>/<position>``)
        so that consumers drop repeats. A replay finds it recorded and emits nothing. Events of
        one ``key`` are sent in the order they were emitted."""
        return self._x.emit(topic, payload, key, headers)

    def now(self) -> datetime:
        """The current time (UTC), recorded so that a replay sees the same value."""
        value: datetime = self._x.record_value("now", self._x.wall_time)
        return value

    def random(self) -> float:
        """A random float in [0, 1), recorded."""
        value: float = self._x.record_value("random", self._x.random)
        return value

    def uuid4(self) -> uuid.UUID:
        """A random UUID, recorded."""
        value: uuid.UUID = self._x.record_value("uuid4", uuid.uuid4)
        return value


class SyncSagaContext:
    """What a plain (``def``) saga body uses; it runs in a thread and blocks on each call."""

    def __init__(self, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
        self._x = runtime
        self._loop = loop
        self._async = SagaContext(runtime)

    @property
    def run_id(self) -> str:
        return self._x.run_id

    def _sync(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            result = fn()
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def step(self, step: Step[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a step, or return its recorded outcome when replaying."""
        result: R = self._sync(lambda: self._x.call_step(step, args, kwargs))
        return result

    def child(self, saga: Saga[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Start ``saga`` as a child run and wait (durably) for its result."""
        result: R = self._sync(lambda: self._x.call_child(saga, args, kwargs))
        return result

    def sleep(self, duration: float | timedelta) -> None:
        """Wait durably (see :meth:`SagaContext.sleep`)."""
        self._sync(lambda: self._async.sleep(duration))

    def sleep_until(self, when: datetime) -> None:
        """Wait durably until an aware datetime."""
        self._sync(lambda: self._async.sleep_until(when))

    def wait_for_signal(
        self,
        name: str,
        *,
        timeout: float | timedelta | None = None,
        default: Any = _MISSING,
    ) -> Any:
        """Wait durably for a signal (see :meth:`SagaContext.wait_for_signal`)."""
        return self._sync(
            lambda: self._async.wait_for_signal(name, timeout=timeout, default=default)
        )

    def wait_for_approval(
        self,
        *,
        timeout: float | timedelta | None = None,
        early: bool | None = None,
        subject: Any = None,
    ) -> Approval:
        """Wait durably for an operator's decision (see :meth:`SagaContext.wait_for_approval`)."""
        result: Approval = self._sync(
            lambda: self._async.wait_for_approval(timeout=timeout, early=early, subject=subject)
        )
        return result

    def record(self, name: str, fn: Callable[[], Any]) -> Any:
        """Call ``fn()`` once and record its result (see :meth:`SagaContext.record`)."""
        return self._sync(lambda: self._x.record_call(name, fn))

    def publish(self, name: str, value: Any) -> None:
        """Publish a small named value for queries."""
        self._sync(lambda: self._x.publish(name, value))

    def emit(
        self,
        topic: str,
        payload: Any = None,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Announce an event (see :meth:`SagaContext.emit`)."""
        event_id: str = self._sync(lambda: self._x.emit(topic, payload, key, headers))
        return event_id

    def now(self) -> datetime:
        value: datetime = self._sync(lambda: self._x.record_value("now", self._x.wall_time))
        return value

    def random(self) -> float:
        value: float = self._sync(lambda: self._x.record_value("random", self._x.random))
        return value

    def uuid4(self) -> uuid.UUID:
        value: uuid.UUID = self._sync(lambda: self._x.record_value("uuid4", uuid.uuid4))
        return value
