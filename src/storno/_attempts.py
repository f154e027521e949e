"""One attempt loop for forward steps and compensations, and the calls it makes.

What a failed attempt means, whether another may follow and when, is decided here once, so a
:class:`~storno.RetryPolicy` means the same thing for a step and for a compensation: the same
``non_retryable`` errors, the same backoff, the same honouring of a provider's Retry-After.

The calls themselves go through :class:`Calls`: an async function that outlives its timeout
is cancelled; a sync function cannot be (it runs in a thread), so the thread is remembered and
the next read-back, retry or compensation of that position first waits for it, within the
step's ``thread_grace``. A call that may still land is never read back as "not applied".
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from storno._clock import Clock
from storno._errors import OutcomeUnknownError, TerminalError, error_info
from storno._model import RetryPolicy

__all__ = [
    "AttemptPlan",
    "Budget",
    "Calls",
    "Failure",
    "LateOutcome",
    "Slot",
    "answer_lost",
    "classify",
    "retry_after_seconds",
    "run_attempts",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


def retry_after_seconds(exc: BaseException, now: float) -> float | None:
    """The wait an error asks for (``retry_after``: seconds, a timedelta or a datetime)."""
    value = getattr(exc, "retry_after", None)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, datetime):
        if value.tzinfo is None:
            return None  # a naive time names no moment: ignore it rather than guess
        seconds = value.timestamp() - now
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


_LOST = (TimeoutError, OutcomeUnknownError, ConnectionResetError, ConnectionAbortedError)


def answer_lost(exc: BaseException) -> bool:
    """Whether the call may have landed although no answer came: a timeout of any client
    (``httpx.ReadTimeout``, ``requests.Timeout`` and their kin are no ``TimeoutError``, so a
    class named like one counts too), a connection reset mid-call, or
    :class:`storno.OutcomeUnknownError`. In doubt the outcome is unknown, never "not applied"."""
    if isinstance(exc, _LOST):
        return True
    return any("Timeout" in kind.__name__ for kind in type(exc).__mro__)


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt, as the history records it and the loop reads it."""

    info: dict[str, Any]  # error_info(), plus "retryable" and, if asked, "retry_after"
    retryable: bool
    lost: bool  # the call may have landed: its answer never came (timeout, lost response)
    not_applied: bool  # the error is one the step declares as proof the call did not land
    retry_after: float | None = None
    still_running: bool = False  # a sync call the engine stopped waiting for, still in its thread


def classify(
    exc: BaseException,
    policy: RetryPolicy,
    not_applied_on: tuple[type[BaseException], ...] = (),
    *,
    now: float,
    still_running: bool = False,
) -> Failure:
    """What an attempt's error means for its outcome and for the next attempt."""
    info = error_info(exc)
    retryable = not isinstance(exc, TerminalError) and policy.is_retryable(exc)
    info["retryable"] = retryable
    wait = retry_after_seconds(exc, now)
    if wait is not None:
        info["retry_after"] = wait
    lost = answer_lost(exc)
    not_applied = bool(not_applied_on) and isinstance(exc, not_applied_on) and not lost
    return Failure(info, retryable, lost, not_applied, wait, still_running and lost)


@dataclass(slots=True)
class Budget:
    """How many attempts a policy still allows, until when, and how long to wait between them.

    ``made`` counts every attempt so far (the history numbers them on); ``spent_before``
    those an operator's retry has forgiven, so the policy's budget starts afresh after it.
    """

    policy: RetryPolicy
    made: int = 0
    spent_before: int = 0
    first_start: float | None = None
    timeout: float | None = None  # over all attempts, from the first one's start
    deadline: float | None = None  # the run's

    @property
    def used(self) -> int:
        return self.made - self.spent_before

    def delay(self, last: Failure | None, rng: Any) -> float:
        """Seconds before the next attempt: the backoff, or a longer Retry-After, capped at
        the policy's maximum interval."""
        if not self.used:
            return 0.0
        wait = self.policy.delay(self.used, rng)
        if last is not None and last.retry_after is not None:
            wait = max(wait, min(last.retry_after, self.policy.maximum_interval))
        return wait

    def stop_reason(self, last: Failure | None, now: float, delay: float) -> str | None:
        """Why no further attempt may start, or ``None`` if one may (after ``delay``)."""
        if not self.used:
            return None
        if last is not None and not last.retryable:
            return "terminal error"
        if not self.policy.allows_another(self.used):
            return f"gave up after {self.used} attempts"
        if self.timeout and self.first_start and now + delay > self.first_start + self.timeout:
            return f"step timeout of {self.timeout:g}s"
        if self.deadline is not None and now + delay >= self.deadline:
            return "run deadline"
        return None

    def time_left(self, now: float, attempt_timeout: float | None) -> float | None:
        """The time an attempt starting now may take: its own limit, the step's, the run's."""
        limits = [attempt_timeout]
        if self.timeout and self.first_start is not None:
            limits.append(self.first_start + self.timeout - now)
        if self.deadline is not None:
            limits.append(self.deadline - now)
        known = [limit for limit in limits if limit is not None]
        return max(min(known), 0.001) if known else None


class AttemptPlan(Protocol[T_co]):
    """What one kind of attempt (a forward step, a compensation) does at each turn."""

    async def begin(self, number: int) -> None:
        """Journal the attempt's start durably, before the call."""

    async def call(self, number: int, time_left: float | None) -> T_co:
        """Make the call once."""

    def classify(self, exc: Exception) -> Failure:
        """What the call's error means."""

    async def failed(self, number: int, failure: Failure) -> T_co | None:
        """Journal the failure; return a value if that settles the attempt (a read-back found
        the call), else ``None`` to go on."""

    def give_up(self, reason: str, last: Failure | None) -> BaseException:
        """The error that ends the loop, journaled."""


async def run_attempts(
    plan: AttemptPlan[T],
    budget: Budget,
    clock: Clock,
    rng: Callable[[], Any],
    *,
    last: Failure | None = None,
    backoff: bool = True,
    attempt_timeout: float | None = None,
) -> T:
    """Attempt until a call succeeds, a failure settles it, or the budget ends it.

    ``rng`` makes the jitter's random source, only when a backoff needs one (seeding a
    ``Random`` costs system calls; most steps never retry).
    """
    while True:
        now = clock.now()
        delay = budget.delay(last, rng()) if backoff and budget.used else 0.0
        backoff = True
        reason = budget.stop_reason(last, now, delay)
        if reason is not None:
            raise plan.give_up(reason, last)
        if delay:
            await clock.sleep(delay)
        budget.made += 1
        await plan.begin(budget.made)
        if budget.first_start is None:
            budget.first_start = clock.now()
        try:
            return await plan.call(budget.made, budget.time_left(clock.now(), attempt_timeout))
        except Exception as exc:
            last = plan.classify(exc)
        settled = await plan.failed(budget.made, last)
        if settled is not None:
            return settled


@dataclass(frozen=True, slots=True)
class LateOutcome(Generic[T]):
    """What a thread the engine had stopped waiting for finally did."""

    finished: bool  # False: still running after the grace
    value: T | None = None
    error: BaseException | None = None


Slot = tuple[str, int, str]
"""Which call: a run, a position, and a role (``step``, ``verify``, ``compensation``)."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a late failure is read by settle(); never log it as unretrieved


class Calls:
    """Makes a step's, read-back's or compensation's call, with its time limit.

    Sync functions run in ``executor``; each one still running after its time limit is kept by
    its slot until it returns, for as long as the process lives (a run that suspends or is
    retried here still sees it), so that nothing reads its position back while a call may still
    land.
    """

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self._running: dict[Slot, list[ThreadFuture[Any]]] = {}

    def still_running(self, slot: Slot) -> bool:
        futures = self._running.get(slot)
        if not futures:
            return False
        futures[:] = [f for f in futures if not f.done()]
        if not futures:
            del self._running[slot]
            return False
        return True

    async def call(
        self,
        fn: Callable[..., Any],
        context: Any,
        args: Any,
        kwargs: Any,
        timeout: float | None,
        *,
        slot: Slot | None = None,
    ) -> Any:
        """Call ``fn(context, *args, **kwargs)``; a sync call that times out stays in
        :meth:`still_running` for ``slot`` until its thread returns."""
        if inspect.iscoroutinefunction(fn):
            pending: Awaitable[Any] = fn(context, *args, **kwargs)
            result = await asyncio.wait_for(pending, timeout) if timeout else await pending
        else:
            # Context variables (a trace's current span, say) reach the step's thread too.
            call = functools.partial(contextvars.copy_context().run, fn, context, *args, **kwargs)
            future = self.executor.submit(call)
            waiting = asyncio.wrap_future(future)
            if not timeout:
                result = await waiting
            else:
                waiting.add_done_callback(_retrieve)
                try:
                    result = await asyncio.wait_for(asyncio.shield(waiting), timeout)
                except TimeoutError:
                    if slot is not None and not future.done():
                        self._running.setdefault(slot, []).append(future)
                    raise
        if inspect.isawaitable(result):
            result = await result
        return result

    async def settle(self, slot: Slot, grace: float) -> LateOutcome[Any] | None:
        """Wait (up to ``grace`` seconds) for the calls at ``slot`` that outlived their time
        limits; ``None`` if there were none. A call that returned wins (it landed); else one
        still running leaves the outcome open; else the first failure is the answer."""
        futures = list(self._running.get(slot, []))
        if not futures:
            return None
        waiting = [asyncio.wrap_future(f) for f in futures]
        for each in waiting:
            each.add_done_callback(_retrieve)
        await asyncio.wait(waiting, timeout=grace)
        self.still_running(slot)  # forget the ones that ended
        ended = [w for w in waiting if w.done() and not w.cancelled()]
        for each in ended:
            if each.exception() is None:
                return LateOutcome(True, value=each.result())
        if len(ended) < len(waiting):
            return LateOutcome(False)
        return LateOutcome(True, error=ended[0].exception())


def failure_data(number: int, failure: Failure, unknown: bool) -> dict[str, Any]:
    """The history's record of a failed attempt; ``outcome_unknown`` is the step's outcome
    after it (an earlier lost answer stays unknown until something settles it)."""
    data: dict[str, Any] = {
        "attempt": number,
        "error": failure.info,
        "outcome_unknown": unknown,
        "lost": failure.lost,
    }
    if failure.not_applied:
        data["not_applied"] = True
    if failure.retry_after is not None:
        data["retry_after"] = failure.retry_after
    if failure.still_running:
        data["still_running"] = True
    return data
