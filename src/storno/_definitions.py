"""Declaring steps: the ``@step`` decorator, the :class:`Step` it makes, and what steps see.

A step is declared once, with its kind, compensation, read-back, retry policy and time limits,
and reused by many sagas; a call site may override these with :meth:`Step.options`. Sagas are
declared in :mod:`storno._saga`.
"""

from __future__ import annotations

import copy
import enum
import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    TypeVar,
    overload,
)

from storno._errors import ConfigurationError
from storno._model import (
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRY,
    DEFAULT_RETRY_AFTER_PIVOT,
    DEFAULT_THREAD_GRACE,
    DEFAULT_VERIFY_TIMEOUT,
    RetryPolicy,
    StepKind,
    seconds,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "NOT_APPLIED",
    "UNKNOWN",
    "CompensationContext",
    "NotApplied",
    "Step",
    "StepContext",
    "Unknown",
    "require_context_parameter",
    "step",
]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class NotApplied(enum.Enum):
    """What a verify function returns when the other system shows no trace of the call."""

    NOT_APPLIED = "not_applied"


NOT_APPLIED: Literal[NotApplied.NOT_APPLIED] = NotApplied.NOT_APPLIED


class Unknown(enum.Enum):
    """The result a compensation sees when its step's outcome could not be established."""

    UNKNOWN = "unknown"


UNKNOWN: Literal[Unknown.UNKNOWN] = Unknown.UNKNOWN


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step's function (and its verify function) is told about the call.

    Pass ``idempotency_key`` to the other system: it is the same on every retry, restart and
    worker, so the other system can recognise a repeat.
    """

    run_id: str
    step: str
    position: int
    idempotency_key: str
    attempt: int
    kind: StepKind


@dataclass(frozen=True, slots=True)
class CompensationContext(Generic[R_co]):
    """What a compensation is told: its own key, and the forward step's recorded outcome.

    ``result`` is the forward step's result, or :data:`storno.UNKNOWN` when the step's
    outcome could not be established (then the compensation must cope with either).
    """

    run_id: str
    step: str
    position: int
    idempotency_key: str
    forward_key: str
    attempt: int
    result: R_co | Unknown
    error: dict[str, Any]

    @property
    def outcome_known(self) -> bool:
        return self.result is not UNKNOWN


StepFn = Callable[..., Any]


@dataclass(slots=True)
class _StepDefinition:
    """The parts of a step shared by every :meth:`Step.options` copy."""

    name: str
    fn: StepFn
    compensate: StepFn | None
    verify: StepFn | None
    signature: inspect.Signature | None = None
    bound: set[Any] = field(default_factory=set)  # argument shapes that bound before

    def bind(self, args: Any, kwargs: Any) -> None:
        """Raise TypeError if the step function cannot take these arguments."""
        # Whether a call binds depends only on how many arguments and which names it passes.
        shape = (len(args), *kwargs) if kwargs else len(args)
        if shape in self.bound:
            return
        if self.signature is None:
            self.signature = inspect.signature(self.fn)
        self.signature.bind(None, *args, **kwargs)
        self.bound.add(shape)


class Step(Generic[P, R]):
    """A declared step. Call it from a saga as ``await ctx.step(my_step, *args)``."""

    def __init__(
        self,
        definition: _StepDefinition,
        *,
        kind: StepKind,
        retry: RetryPolicy | None,
        compensation_retry: RetryPolicy | None,
        timeout: float | None,
        attempt_timeout: float | None,
        compensation_timeout: float | None = None,
        verify_timeout: float | None = None,
        thread_grace: float | None = None,
        not_applied_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._definition = definition
        self.kind = kind
        self._retry = retry
        self._compensation_retry = compensation_retry
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.compensation_timeout = compensation_timeout
        self.verify_timeout = DEFAULT_VERIFY_TIMEOUT if verify_timeout is None else verify_timeout
        self.thread_grace = DEFAULT_THREAD_GRACE if thread_grace is None else thread_grace
        self.not_applied_on = not_applied_on
        self.__doc__ = definition.fn.__doc__
        self.__wrapped__ = definition.fn
        self.ref = f"{definition.fn.__module__}:{definition.fn.__qualname__}"

    @property
    def name(self) -> str:
        return self._definition.name

    @property
    def fn(self) -> StepFn:
        return self._definition.fn

    @property
    def compensate_fn(self) -> StepFn | None:
        return self._definition.compensate

    @property
    def verify_fn(self) -> StepFn | None:
        return self._definition.verify

    @property
    def retry(self) -> RetryPolicy:
        if self._retry is not None:
            return self._retry
        return DEFAULT_RETRY_AFTER_PIVOT if self.kind is StepKind.RETRYABLE else DEFAULT_RETRY

    @property
    def compensation_retry(self) -> RetryPolicy:
        return self._compensation_retry or DEFAULT_COMPENSATION_RETRY

    def compensation(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator form of ``compensate=``: ``@charge.compensation def refund(ctx, ...)``."""
        self._definition.compensate = fn
        return fn

    def verifier(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator form of ``verify=``: a read-back that says whether the call landed."""
        self._definition.verify = fn
        return fn

    def options(
        self,
        *,
        kind: StepKind | str | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        attempt_timeout: float | timedelta | None = None,
        compensation_timeout: float | timedelta | None = None,
        verify_timeout: float | timedelta | None = None,
        thread_grace: float | timedelta | None = None,
        not_applied_on: tuple[type[BaseException], ...] | None = None,
    ) -> Step[P, R]:
        """A copy with some settings overridden, for one call site."""
        clone = copy.copy(self)
        if kind is not None:
            clone.kind = StepKind.parse(kind)
        if retry is not None:
            clone._retry = retry
        if compensation_retry is not None:
            clone._compensation_retry = compensation_retry
        if timeout is not None:
            clone.timeout = seconds(timeout, "timeout")
        if attempt_timeout is not None:
            clone.attempt_timeout = seconds(attempt_timeout, "attempt_timeout")
        if compensation_timeout is not None:
            clone.compensation_timeout = seconds(compensation_timeout, "compensation_timeout")
        if verify_timeout is not None:
            clone.verify_timeout = seconds(verify_timeout, "verify_timeout") or clone.verify_timeout
        if thread_grace is not None:
            clone.thread_grace = seconds(thread_grace, "thread_grace") or clone.thread_grace
        if not_applied_on is not None:
            clone.not_applied_on = _error_types(not_applied_on, "not_applied_on")
        return clone

    def check_arguments(self, args: Any, kwargs: Any) -> None:
        """Raise TypeError if the step cannot be called with these arguments."""
        self._definition.bind(args, kwargs)

    def check_runnable(self) -> None:
        """Refuse a step that cannot honour its kind (a compensable step must compensate)."""
        if self.kind is StepKind.COMPENSABLE and self.compensate_fn is None:
            raise ConfigurationError(
                f"step {self.name!r} is compensable but has no compensation; pass "
                f"compensate=... to @storno.step, decorate one with @{self.name}.compensation, "
                f"or declare it kind='retryable' / 'noncompensable' / 'pivot'"
            )

    def __repr__(self) -> str:
        return f"<storno.Step {self.name!r} kind={self.kind.value}>"


@overload
def step(
    fn: None = None,
    *,
    kind: StepKind | str = ...,
    compensate: StepFn | None = ...,
    verify: StepFn | None = ...,
    retry: RetryPolicy | None = ...,
    compensation_retry: RetryPolicy | None = ...,
    timeout: float | timedelta | None = ...,
    attempt_timeout: float | timedelta | None = ...,
    compensation_timeout: float | timedelta | None = ...,
    verify_timeout: float | timedelta | None = ...,
    thread_grace: float | timedelta | None = ...,
    not_applied_on: tuple[type[BaseException], ...] = ...,
    name: str | None = ...,
) -> _StepDecorator: ...


@overload
def step(fn: Callable[Concatenate[StepContext, P], Coroutine[Any, Any, R]], /) -> Step[P, R]: ...


@overload
def step(fn: Callable[Concatenate[StepContext, P], R], /) -> Step[P, R]: ...


def step(
    fn: Callable[..., Any] | None = None,
    *,
    kind: StepKind | str = StepKind.COMPENSABLE,
    compensate: StepFn | None = None,
    verify: StepFn | None = None,
    retry: RetryPolicy | None = None,
    compensation_retry: RetryPolicy | None = None,
    timeout: float | timedelta | None = None,
    attempt_timeout: float | timedelta | None = None,
    compensation_timeout: float | timedelta | None = None,
    verify_timeout: float | timedelta | None = None,
    thread_grace: float | timedelta | None = None,
    not_applied_on: tuple[type[BaseException], ...] = (),
    name: str | None = None,
) -> Any:
    """Declare a step. Its function takes a :class:`StepContext` first, then its arguments.

    ``kind`` is one of compensable (the default), pivot, retryable, noncompensable.
    ``compensate(ctx: CompensationContext, *same_args)`` undoes it; ``verify(ctx:
    StepContext, *same_args)`` reads back whether a call with ``ctx.idempotency_key``
    landed and returns its result, or :data:`storno.NOT_APPLIED`. ``timeout`` bounds the
    step over all attempts; ``attempt_timeout`` bounds one attempt (a timed-out attempt has
    an unknown outcome and is verified or retried with the same key); ``compensation_timeout``
    one compensation attempt and ``verify_timeout`` one read-back (each its own limit, none
    inherited). ``thread_grace``: how long a sync call that outlived its timeout is waited for
    before its position is read back or retried. ``not_applied_on``: errors that prove the
    call did not take effect (a decline replayed under the same key); they settle an
    unknown outcome, which no other error does.
    """
    decorator = _StepDecorator(
        kind=StepKind.parse(kind),
        compensate=compensate,
        verify=verify,
        retry=retry,
        compensation_retry=compensation_retry,
        timeout=seconds(timeout, "timeout"),
        attempt_timeout=seconds(attempt_timeout, "attempt_timeout"),
        compensation_timeout=seconds(compensation_timeout, "compensation_timeout"),
        verify_timeout=seconds(verify_timeout, "verify_timeout"),
        thread_grace=seconds(thread_grace, "thread_grace"),
        not_applied_on=_error_types(not_applied_on, "not_applied_on"),
        name=name,
    )
    return decorator(fn) if fn is not None else decorator


@dataclass(frozen=True, slots=True)
class _StepDecorator:
    kind: StepKind
    compensate: StepFn | None
    verify: StepFn | None
    retry: RetryPolicy | None
    compensation_retry: RetryPolicy | None
    timeout: float | None
    attempt_timeout: float | None
    compensation_timeout: float | None
    verify_timeout: float | None
    thread_grace: float | None
    not_applied_on: tuple[type[BaseException], ...]
    name: str | None

    @overload
    def __call__(
        self, fn: Callable[Concatenate[StepContext, P], Coroutine[Any, Any, R]]
    ) -> Step[P, R]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[StepContext, P], R]) -> Step[P, R]: ...

    def __call__(self, fn: Callable[..., Any]) -> Step[..., Any]:
        require_context_parameter(fn, "step", "StepContext")
        definition = _StepDefinition(
            name=self.name or fn.__name__, fn=fn, compensate=self.compensate, verify=self.verify
        )
        return Step(
            definition,
            kind=self.kind,
            retry=self.retry,
            compensation_retry=self.compensation_retry,
            timeout=self.timeout,
            attempt_timeout=self.attempt_timeout,
            compensation_timeout=self.compensation_timeout,
            verify_timeout=self.verify_timeout,
            thread_grace=self.thread_grace,
            not_applied_on=self.not_applied_on,
        )


def _error_types(value: Any, what: str) -> tuple[type[BaseException], ...]:
    """A tuple of exception classes, or a ConfigurationError naming what is not one."""
    items = (value,) if isinstance(value, type) else tuple(value)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ConfigurationError(f"{what} takes exception classes, got {item!r}")
    return items


def require_context_parameter(fn: Callable[..., Any], what: str, ctx_type: str) -> None:
    if not callable(fn):
        raise ConfigurationError(f"@storno.{what} decorates a function, got {fn!r}")
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ConfigurationError(
            f"{what} function {fn.__qualname__} must take a {ctx_type} as its first "
            f"parameter, e.g. def {fn.__name__}(ctx, ...)"
        )
