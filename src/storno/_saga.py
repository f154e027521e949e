"""Declaring sagas: the ``@saga`` decorator and the :class:`Saga` it makes.

A saga is a function whose first parameter is its context (``SagaContext`` for ``async def``,
``SyncSagaContext`` for a plain function, which runs in a thread); its body calls steps, waits
and child sagas through the context. :meth:`Saga.options` makes a copy for one start.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from storno._definitions import require_context_parameter
from storno._errors import ConfigurationError
from storno._model import seconds

if TYPE_CHECKING:
    from storno._context import SagaContext, SyncSagaContext

__all__ = ["Saga", "saga"]

P = ParamSpec("P")
R = TypeVar("R")


class Saga(Generic[P, R]):
    """A declared saga. Start it with ``await app.start(my_saga, *args)``."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        timeout: float | None,
        run_id: str | None = None,
        stuck_after: float | None = None,
        max_concurrent: int | None = None,
        early_approvals: bool = False,
    ) -> None:
        if max_concurrent is not None and max_concurrent < 1:
            raise ConfigurationError(
                f"max_concurrent of saga {name!r} must be at least 1 (or None for no limit), "
                f"got {max_concurrent}"
            )
        self.fn = fn
        self.max_concurrent = max_concurrent
        self.early_approvals = early_approvals
        self.name = name
        self.timeout = timeout
        self.run_id = run_id
        self.correlation_id: str | None = None
        self.stuck_after = stuck_after
        self.start_at: float | None = None
        self.start_delay: float | None = None
        self.is_async = inspect.iscoroutinefunction(fn)
        # The saga as declared, without per-start options: what an application registers.
        self.declared: Saga[P, R] = self
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def options(
        self,
        *,
        run_id: str | None = None,
        timeout: float | timedelta | None = None,
        start_at: datetime | None = None,
        start_delay: float | timedelta | None = None,
        stuck_after: float | timedelta | None = None,
        correlation_id: str | None = None,
    ) -> Saga[P, R]:
        """A copy to start with a caller-chosen run id, a deadline (``timeout`` from the
        start), or a scheduled start (``start_at`` an aware datetime, or ``start_delay``).
        ``stuck_after`` overrides how long a run may go without progress before operator
        tools flag it as stuck. ``correlation_id`` ties the run into a choreography: its events
        carry it (else the run's own id), and the dashboard shows the runs that share it.

        Starting the same run id again returns the existing run, never a second one.
        """
        clone = copy.copy(self)
        clone.declared = self.declared
        if start_at is not None and start_delay is not None:
            raise ConfigurationError("give start_at or start_delay, not both")
        if start_at is not None:
            if start_at.tzinfo is None:
                raise ConfigurationError(
                    f"start_at needs an aware datetime (with a time zone), got {start_at!r}"
                )
            clone.start_at = start_at.timestamp()
            clone.start_delay = None
        if start_delay is not None:
            clone.start_delay = seconds(start_delay, "start_delay")
            clone.start_at = None
        if run_id is not None:
            if not run_id or len(run_id) > 200:
                raise ConfigurationError("run_id must be 1 to 200 characters")
            clone.run_id = run_id
        if timeout is not None:
            clone.timeout = seconds(timeout, "timeout")
        if correlation_id is not None:
            if not correlation_id or len(correlation_id) > 200:
                raise ConfigurationError("correlation_id must be 1 to 200 characters")
            clone.correlation_id = correlation_id
        if stuck_after is not None:
            clone.stuck_after = seconds(stuck_after, "stuck_after")
        return clone

    def __repr__(self) -> str:
        return f"<storno.Saga {self.name!r}>"


@overload
def saga(fn: Callable[Concatenate[SagaContext, P], Coroutine[Any, Any, R]], /) -> Saga[P, R]: ...


@overload
def saga(fn: Callable[Concatenate[SyncSagaContext, P], R], /) -> Saga[P, R]: ...


@overload
def saga(
    fn: None = None,
    *,
    name: str | None = ...,
    timeout: float | timedelta | None = ...,
    stuck_after: float | timedelta | None = ...,
    max_concurrent: int | None = ...,
    early_approvals: bool = ...,
) -> _SagaDecorator: ...


def saga(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    timeout: float | timedelta | None = None,
    stuck_after: float | timedelta | None = None,
    max_concurrent: int | None = None,
    early_approvals: bool = False,
) -> Any:
    """Declare a saga: ``async def f(ctx: SagaContext, ...)`` or ``def f(ctx: SyncSagaContext,
    ...)``. ``timeout`` is the default deadline of each run, from its start. ``stuck_after``:
    a run that has not ended and made no progress for this long is flagged as stuck by
    ``storno stuck``, the dashboard and the metrics (default one hour). ``max_concurrent``:
    at most this many runs of the saga execute at once across all workers sharing the
    database (waiting runs do not count). ``early_approvals``: ``approve()``/``reject()``
    may come before the run waits for the decision (else they are refused), and its
    ``ctx.wait_for_approval()`` calls take such a decision unless they pass ``early=False``."""
    decorator = _SagaDecorator(
        name=name,
        timeout=seconds(timeout, "timeout"),
        stuck_after=seconds(stuck_after, "stuck_after"),
        max_concurrent=max_concurrent,
        early_approvals=early_approvals,
    )
    return decorator(fn) if fn is not None else decorator


@dataclass(frozen=True, slots=True)
class _SagaDecorator:
    name: str | None
    timeout: float | None
    stuck_after: float | None = None
    max_concurrent: int | None = None
    early_approvals: bool = False

    @overload
    def __call__(
        self, fn: Callable[Concatenate[SagaContext, P], Coroutine[Any, Any, R]]
    ) -> Saga[P, R]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[SyncSagaContext, P], R]) -> Saga[P, R]: ...

    def __call__(self, fn: Callable[..., Any]) -> Saga[..., Any]:
        require_context_parameter(fn, "saga", "SagaContext")
        return Saga(
            fn,
            name=self.name or fn.__name__,
            timeout=self.timeout,
            stuck_after=self.stuck_after,
            max_concurrent=self.max_concurrent,
            early_approvals=self.early_approvals,
        )
