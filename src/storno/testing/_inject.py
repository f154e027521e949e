"""Fault injection for users' tests: failing, timing out and crashing steps on purpose.

Built on the engine's fault points (:mod:`storno._faults`). An ``Exception`` raised at a
step's or compensation's start counts as that attempt's own failure; a
:class:`SimulatedCrash` (a ``BaseException``) escapes the engine as a dying process would,
leaving the run leased to its worker until :func:`restart_worker` starts a worker with the same
id, which resumes it at once.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from storno import _faults
from storno._errors import TerminalError
from storno._worker import run_task_name
from storno.testing._restart import restart_worker, restart_workers
from storno.testing._rules import (
    CALL_POINTS,
    ErrorSpec,
    FaultRule,
    Injection,
    SimulatedCrash,
    StepRef,
    When,
    error_maker,
    step_name,
)

__all__ = [
    "FaultInjector",
    "FaultRule",
    "Injection",
    "SimulatedCrash",
    "restart_worker",
    "restart_workers",
]


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
        name = step_name(step)
        what = f"transient failure of step {name!r}"
        return self.add(
            FaultRule(
                what,
                "step.started",
                error_maker(error, ConnectionError, what),
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
        name = step_name(step)
        what = f"terminal failure of step {name!r}"
        return self.add(
            FaultRule(
                what,
                "step.started",
                error_maker(error, TerminalError, what),
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
        name = step_name(step)
        what = f"timeout of step {name!r}" + (" after the call landed" if landed else "")
        return self.add(
            FaultRule(
                what,
                "step.returned" if landed else "step.started",
                error_maker(None, TimeoutError, what),
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
        name = step_name(step)
        what = f"failure of the compensation of step {name!r}"
        return self.add(
            FaultRule(
                what,
                "compensation.started",
                error_maker(error, ConnectionError, what),
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
        if (where, when) not in CALL_POINTS:
            raise ValueError(f'when must be "before_call" or "after_call", got {when!r}')
        point = CALL_POINTS[where, when]
        name = step_name(step)
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
            if rule.applies(point, details, call) and rule.take(details.get("run_id"), call):
                error = rule.make_error(details)
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
