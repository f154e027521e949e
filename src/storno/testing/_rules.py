"""The parts of a fault: a rule that says where and when to inject, and what was injected.

A :class:`FaultRule` matches one of the engine's fault points (:mod:`storno._faults`) for a step
(and a run, a call, an attempt); :class:`SimulatedCrash` is the ``BaseException`` that stands
for a dying process.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from storno import _faults
from storno._definitions import Step

__all__ = [
    "CALL_POINTS",
    "ErrorSpec",
    "FaultRule",
    "Injection",
    "SimulatedCrash",
    "StepRef",
    "When",
    "error_maker",
    "step_name",
]

StepRef = str | Step[..., Any]
ErrorSpec = BaseException | type[BaseException] | None
When = Literal["before_call", "after_call"]
CALL_POINTS = {
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

    def applies(self, point: str, details: dict[str, Any], call: int | None) -> bool:
        """Whether the rule is about this point, step, run and call."""
        if point != self.point:
            return False
        if self.step is not None and details.get("step") != self.step:
            return False
        if self.run_id is not None and details.get("run_id") != self.run_id:
            return False
        if self.call is not None and call != self.call:
            return False
        return all(details.get(k) == v for k, v in self.match.items())

    def take(self, run_id: str | None, call: int | None) -> bool:
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

    def make_error(self, details: dict[str, Any]) -> BaseException:
        """The error to raise at a point where the rule fires."""
        return self._make_error(details)


def error_maker(
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


def step_name(step: StepRef) -> str:
    return step.name if isinstance(step, Step) else step
