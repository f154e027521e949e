"""Fault injection for users' tests: failing, timing out and crashing steps on purpose.

Built on the engine's fault points (:mod:`storno._faults`). An ``Exception`` raised at a
step's or compensation's start counts as that attempt's own failure; a
:class:`SimulatedCrash` (a ``BaseException``) escapes the engine as a dying process would,
leaving the run leased to its worker until :func:`restart_worker` starts a worker with the same
id, which resumes it at once.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from storno import _faults
from storno._definitions import Step
from storno._errors import TerminalError
from storno._worker import run_task_name

if TYPE_CHECKING:
    from storno._app import Storno
    from storno._worker import Worker

__all__ = [
    "FaultInjector",
    "FaultRule",
    "Injection",
    "SimulatedCrash",
    "restart_worker",
    "restart_workers",
]

StepRef = str | Step[..., Any]
ErrorSpec = BaseException | type[BaseException] | None
When = Literal["before_call", "after_call"]
_POINTS = {
    ("step", "before_call"): "step.started",
    ("step", "after_call"): "step.returned",
    ("compensation", "before_call"): "compensation.started",
    ("compensation", "after_call"): "compensation.returned",
}


class SimulatedCrash(BaseException):
    """The worker's process 'dies' at a fault point.

    A ``BaseException``, so it escapes the engine's error handling: the run's task ends with
    nothing more written and its lease still held, as after a SIGKILL. Resume the run with
    :func:`restart_worker` (or let the lease expire).
    """

    def __init__(self, point: str, details: dict[str, Any]) -> None:
        where = ", ".join(f"{k}={v!r}" for k, v in details.items())
        super().__init__(f"simulated crash at {point} ({where})")
        self.point = point
        self.details = dict(details)


@dataclass(frozen=True, slots=True)
class Injection:
    """One fault that fired: where, in which run, and what was raised."""

    rule: FaultRule
    point: str
    run_id: str | None
    step: str | None
    attempt: int | None
    call: int | None
    error: BaseException

    @property
    def crashed(self) -> bool:
        return isinstance(self.error, SimulatedCrash)


class FaultRule:
    """One rule of a :class:`FaultInjector`: at ``point``, for ``step``, raise an error.

    ``times`` faults are injected per call of the step in each run (``None``: every time),
    after letting the first ``after`` visits through. ``fired`` counts the faults injected;
    ``crashes`` says whether they are simulated crashes.
    """

    def __init__(
        self,
        description: str,
        point: str,
        make_error: Callable[[dict[str, Any]], BaseException],
        *,
        step: str | None = None,
        times: int | None = 1,
        after: int = 0,
        run_id: str | None = None,
        call: int | None = None,
        match: dict[str, Any] | None = None,
        crashes: bool = False,
    ) -> None:
        if point not in _faults.POINTS:
            raise ValueError(f"unknown fault point {point!r}; the engine has {_faults.POINTS}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 (or None for always), got {times}")
        if after < 0:
            raise ValueError(f"after must not be negative, got {after}")
        if call is not None and call < 1:
            raise ValueError(f"call counts from 1, got {call}")
        self.description = description
        self.point = point
        self.crashes = crashes
        self.step = step
        self.times = times
        self.after = after
        self.run_id = run_id
        self.call = call
        self.match = dict(match or {})
        self.fired = 0
        self._make_error = make_error
        self._visits: dict[tuple[str | None, int | None], int] = {}
        self._fired_at: dict[tuple[str | None, int | None], int] = {}

    def __repr__(self) -> str:
        return f"<FaultRule {self.description} at {self.point}, fired {self.fired}>"

    def _applies(self, point: str, details: dict[str, Any], call: int | None) -> bool:
        if point != self.point:
            return False
        if self.step is not None and details.get("step") != self.step:
            return False
        if self.run_id is not None and details.get("run_id") != self.run_id:
            return False
        if self.call is not None and call != self.call:
            return False
        return all(details.get(k) == v for k, v in self.match.items())

    def _take(self, run_id: str | None, call: int | None) -> bool:
        """Count a visit; True if this one gets the fault."""
        slot = (run_id, call)
        visits = self._visits[slot] = self._visits.get(slot, 0) + 1
        if visits <= self.after:
            return False
        fired = self._fired_at.get(slot, 0)
        if self.times is not None and fired >= self.times:
            return False
        self._fired_at[slot] = fired + 1
        self.fired += 1
        return True


def _error_maker(
    error: ErrorSpec, default: type[BaseException], what: str
) -> Callable[[dict[str, Any]], BaseException]:
    def make(details: dict[str, Any]) -> BaseException:
        if isinstance(error, BaseException):
            return copy.copy(error)
        kind = error or default
        run, attempt = details.get("run_id"), details.get("attempt")
        suffix = f" (run {run}, attempt {attempt})" if attempt else f" (run {run})"
        return kind(f"injected: {what}{suffix}")

    return make


def _step_name(step: StepRef) -> str:
    return step.name if isinstance(step, Step) else step


def _forget_crash(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # the crash was meant: do not log it as never retrieved


def _quiet_crash(run_id: str | None) -> None:
    """Keep asyncio from logging the simulated crash as a task error nobody retrieved: the
    task it is raised in, and the worker's task for the run (a different one when the saga
    body is a plain function running in a thread)."""
    try:
        current = asyncio.current_task()
        tasks = asyncio.all_tasks()
    except RuntimeError:
        return
    name = run_task_name(run_id) if run_id is not None else None
    for task in tasks:
        if task is current or task.get_name() == name:
            task.add_done_callback(_forget_crash)


class FaultInjector:
    """Makes chosen steps and compensations fail, time out or crash, for a test.

    Use it as a context manager (or :meth:`install` / :meth:`uninstall`); while installed it
    is the engine's fault hook for the whole process (a hook installed before it still sees
    the points its rules do not fire on). Rules name steps by name (or by their ``Step``), and
    count per call of the step in each run: ``fail("charge", times=2)`` makes the first two
    attempts of every ``charge`` call fail, then lets the third through. ``call=2`` limits a
    rule to the second call of that step in a run, ``run_id=`` to one run, ``after=n`` lets n
    visits through first. Rules at the same point take turns in the order they were added.

    Every fault that fired is kept in :attr:`injections`.
    """

    def __init__(self) -> None:
        self.rules: list[FaultRule] = []
        self.injections: list[Injection] = []
        self._calls: dict[tuple[str | None, str, str | None], int] = {}
        self._compensation_attempts: dict[tuple[str | None, str | None], int] = {}
        self._previous: _faults.Hook | None = None
        self._installed = False
        self._crashes_taken = 0

    # --- installing ----------------------------------------------------------------------

    def install(self) -> FaultInjector:
        if self._installed:
            raise RuntimeError("this FaultInjector is already installed")
        self._previous = _faults.set_hook(self._hook)
        self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            _faults.set_hook(self._previous)
            self._previous = None
            self._installed = False

    def __enter__(self) -> FaultInjector:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # --- rules -------------------------------------------------------------------------

    def add(self, rule: FaultRule) -> FaultRule:
        """Add a rule made by hand (the methods below cover the usual faults)."""
        self.rules.append(rule)
        return rule

    def fail(
        self,
        step: StepRef,
        *,
        times: int | None = 1,
        error: ErrorSpec = None,
        after: int = 0,
        run_id: str | None = None,
        call: int | None = None,
    ) -> FaultRule:
        """The step's attempts fail before the call is made, with a transient error
        (``ConnectionError`` unless ``error`` is given: an instance, or a type to raise with a
        message), so the engine retries them by the step's retry policy."""
        name = _step_name(step)
        what = f"transient failure of step {name!r}"
        return self.add(
            FaultRule(
                what,
                "step.started",
                _error_maker(error, ConnectionError, what),
                step=name,
                times=times,
                after=after,
                run_id=run_id,
                call=call,
            )
        )

    def fail_terminally(
        self,
        step: StepRef,
        *,
        error: ErrorSpec = None,
        after: int = 0,
        run_id: str | None = None,
        call: int | None = None,
    ) -> FaultRule:
        """The step fails with :class:`storno.TerminalError` before its call: the forward path
        ends (compensation before the point of no return, a parked run after it)."""
        name = _step_name(step)
        what = f"terminal failure of step {name!r}"
        return self.add(
            FaultRule(
                what,
                "step.started",
                _error_maker(error, TerminalError, what),
                step=name,
                after=after,
                run_id=run_id,
                call=call,
            )
        )

    def time_out(
        self,
        step: StepRef,
        *,
        times: int | None = 1,
        after: int = 0,
        run_id: str | None = None,
        call: int | None = None,
        landed: bool = False,
    ) -> FaultRule:
        """The step's attempts time out: before the other system sees the call, or with
        ``landed=True`` after the call took effect (its answer is lost).

        The engine cannot tell which: it records the outcome as unknown, reads back through
        the step's ``verify`` (which must find the call when it landed and answer
        ``storno.NOT_APPLIED`` when it did not), else retries under the same idempotency key.
        """
        name = _step_name(step)
        what = f"timeout of step {name!r}" + (" after the call landed" if landed else "")
        return self.add(
            FaultRule(
                what,
                "step.returned" if landed else "step.started",
                _error_maker(None, TimeoutError, what),
                step=name,
                times=times,
                after=after,
                run_id=run_id,
                call=call,
            )
        )

    def crash(
        self,
        step: StepRef,
        *,
        when: When = "before_call",
        times: int | None = 1,
        after: int = 0,
        run_id: str | None = None,
        call: int | None = None,
    ) -> FaultRule:
        """The worker dies at this step: ``"before_call"`` just after the attempt was
        recorded, ``"after_call"`` after the call returned (its effect landed) but before its
        result was recorded. Restart the worker (:func:`restart_worker`) to resume the run."""
        return self._crash("step", step, when, times, after, run_id, call)

    def fail_compensation(
        self,
        step: StepRef,
        *,
        times: int | None = 1,
        error: ErrorSpec = None,
        after: int = 0,
        run_id: str | None = None,
        call: int | None = None,
    ) -> FaultRule:
        """The step's compensation attempts fail before their call (``ConnectionError`` unless
        ``error`` is given); they are retried by its ``compensation_retry``. ``times=None``
        (or more failures than that policy allows) makes a dead letter."""
        name = _step_name(step)
        what = f"failure of the compensation of step {name!r}"
        return self.add(
            FaultRule(
                what,
                "compensation.started",
                _error_maker(error, ConnectionError, what),
                step=name,
                times=times,
                after=after,
                run_id=run_id,
                call=call,
            )
        )

    def crash_compensation(
        self,
        step: StepRef,
        *,
        when: When = "after_call",
        times: int | None = 1,
        after: int = 0,
        run_id: str | None = None,
        call: int | None = None,
    ) -> FaultRule:
        """The worker dies in the step's compensation, before its call or after it landed
        but before it was recorded; the restarted worker runs it again under the same key."""
        return self._crash("compensation", step, when, times, after, run_id, call)

    def crash_at(
        self, point: str, *, times: int | None = 1, after: int = 0, **match: Any
    ) -> FaultRule:
        """The worker dies at any engine fault point whose details equal ``match`` (e.g.
        ``crash_at("run.ending", status="completed")``)."""
        what = f"crash at {point}" + "".join(f" {k}={v!r}" for k, v in match.items())
        step = match.pop("step", None)
        run_id = match.pop("run_id", None)
        return self.add(
            FaultRule(
                what,
                point,
                lambda details: SimulatedCrash(point, details),
                step=step,
                times=times,
                after=after,
                run_id=run_id,
                match=match,
                crashes=True,
            )
        )

    def _crash(
        self,
        where: Literal["step", "compensation"],
        step: StepRef,
        when: When,
        times: int | None,
        after: int,
        run_id: str | None,
        call: int | None,
    ) -> FaultRule:
        if (where, when) not in _POINTS:
            raise ValueError(f'when must be "before_call" or "after_call", got {when!r}')
        point = _POINTS[where, when]
        name = _step_name(step)
        subject = f"step {name!r}" if where == "step" else f"the compensation of step {name!r}"
        what = f"crash {when.replace('_', ' ')} of {subject}"
        return self.add(
            FaultRule(
                what,
                point,
                lambda details: SimulatedCrash(point, details),
                step=name,
                times=times,
                after=after,
                run_id=run_id,
                call=call,
                crashes=True,
            )
        )

    def clear(self) -> None:
        """Remove every rule (what already fired stays in :attr:`injections`)."""
        self.rules.clear()

    # --- what happened -----------------------------------------------------------------

    @property
    def crashes(self) -> list[Injection]:
        return [i for i in self.injections if i.crashed]

    def assert_fired(self) -> None:
        """Fail if a rule never fired: a misspelt step, or a path the run never took."""
        idle = [r for r in self.rules if not r.fired]
        if idle:
            raise AssertionError(
                "fault rules that never fired: " + "; ".join(r.description for r in idle)
            )

    async def wait_for_crash(self, timeout: float = 10.0) -> Injection:
        """Wait until the next simulated crash (one not returned before) has happened."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            crashes = self.crashes
            if len(crashes) > self._crashes_taken:
                self._crashes_taken += 1
                return crashes[self._crashes_taken - 1]
            if loop.time() > deadline:
                rules = [r.description for r in self.rules if r.crashes]
                raise AssertionError(
                    f"no simulated crash within {timeout}s (crash rules: {rules or 'none'})"
                )
            await asyncio.sleep(0.002)

    # --- the hook ------------------------------------------------------------------------

    def _call_of(self, point: str, details: dict[str, Any]) -> int | None:
        """Which call of the step in its run this point belongs to (1-based)."""
        where, _, moment = point.partition(".")
        if where not in ("step", "compensation"):
            return None
        key = (details.get("run_id"), where, details.get("step"))
        attempt = details.get("attempt")
        if where == "compensation":
            slot = (details.get("run_id"), details.get("step"))
            if moment == "started":
                self._compensation_attempts[slot] = attempt or 1
            elif attempt is None:
                details["attempt"] = self._compensation_attempts.get(slot)
        if moment == "started" and (attempt == 1 or key not in self._calls):
            self._calls[key] = self._calls.get(key, 0) + 1
        return self._calls.get(key, 1)

    def _hook(self, point: str, original: dict[str, Any]) -> None:
        details = dict(original)
        call = self._call_of(point, details)
        for rule in list(self.rules):
            if rule._applies(point, details, call) and rule._take(details.get("run_id"), call):
                error = rule._make_error(details)
                self.injections.append(
                    Injection(
                        rule,
                        point,
                        details.get("run_id"),
                        details.get("step"),
                        details.get("attempt"),
                        call,
                        error,
                    )
                )
                if isinstance(error, SimulatedCrash):
                    _quiet_crash(details.get("run_id"))
                raise error
        if self._previous is not None:
            self._previous(point, original)


async def restart_worker(worker: Worker, *, grace: float = 10.0) -> Worker:
    """Stand in for restarting a worker's process after a :class:`SimulatedCrash`.

    Stops ``worker`` (its other runs get ``grace`` seconds to finish, then are handed back)
    and starts a new worker for the same application with the same ``worker_id``, which
    resumes the runs its predecessor held at once. Returns the new worker; the application
    stops it when it closes.
    """
    app = worker.app
    await worker.stop(grace=grace)
    successor = app.worker(
        worker_id=worker.id, concurrency=worker.concurrency, poll_interval=worker.poll_interval
    )
    await successor.start()
    return successor


async def restart_workers(app: Storno, *, grace: float = 10.0) -> list[Worker]:
    """:func:`restart_worker` for every worker running in ``app``: a process restart."""
    workers = app.workers
    for worker in workers:
        await worker.stop(grace=grace)
    successors = []
    for worker in workers:
        successor = app.worker(
            worker_id=worker.id, concurrency=worker.concurrency, poll_interval=worker.poll_interval
        )
        await successor.start()
        successors.append(successor)
    return successors
