"""The replay cursor: which position the saga body is at, and what the history holds there.

On every (re)start the body runs again from the top; each step, wait or recorded value takes the
next position. Where the history already holds that position the recorded outcome is used, and
where it holds something else the code has changed under the run: the cursor records a
:class:`~storno.DeterminismError` that parks the run. The cursor also enforces the order rule at
run time: nothing compensable after the point of no return, and no point of no return running
alongside other steps.
"""

from __future__ import annotations

from typing import Any

from storno._definitions import Step
from storno._errors import DeterminismError, PlanError
from storno._history import Fold, StepState, WaitState
from storno._model import StepKind

__all__ = ["Replay"]


class Replay:
    """Positions handed out to one execution of a saga body, checked against its history."""

    def __init__(self, recorded: Fold) -> None:
        self.recorded = recorded
        self._position = 0
        self.park_error: DeterminismError | None = None
        self._forward_only_since: str | None = None
        self._in_flight: dict[int, str] = {}  # positions of steps being called right now
        # The step objects the body called, with any call-site overrides: compensation uses
        # them first, and looks steps up by name only when the body did not run this time.
        self._steps_used: dict[int, Step[..., Any]] = {}

    def take(self) -> int:
        """The next position; refused once the run is to be parked."""
        if self.park_error is not None:
            raise self.park_error
        position = self._position
        self._position += 1
        return position

    def mismatch(self, position: int, wanted: str) -> DeterminismError:
        """Record (and return, to raise) that the code asks for another thing than the history
        holds at ``position``."""
        self.park_error = DeterminismError(
            f"at position {position} the saga code asks for {wanted} but the history recorded "
            f"{self.recorded.kind_at(position)}; the code no longer matches this run's history"
        )
        return self.park_error

    def park(self, error: DeterminismError) -> DeterminismError:
        self.park_error = error
        return error

    def unreached(self) -> None:
        """At the body's end: the history must not hold positions the code no longer reaches."""
        if self.park_error is None and self.recorded.last_position >= self._position:
            what = self.recorded.kind_at(self._position)
            self.park_error = DeterminismError(
                f"the history holds {what} at position {self._position}, which the saga code "
                f"no longer reaches; the code changed under a running run"
            )

    # --- what the history holds -----------------------------------------------------------

    def step_at(self, position: int, wanted: str) -> StepState | None:
        """The recorded step (or child run) at ``position``; a mismatch if something else is."""
        state = self.recorded.steps.get(position)
        if state is None and (position in self.recorded.values or position in self.recorded.waits):
            raise self.mismatch(position, wanted)
        return state

    def value_at(self, position: int, name: str) -> tuple[bool, str | None]:
        """``(True, text)`` if ``ctx.<name>()`` was recorded at ``position``, else
        ``(False, None)``; a mismatch if something else is there."""
        recorded = self.recorded.values.get(position)
        if recorded is not None and recorded[0] == name:
            return True, recorded[1]
        if recorded is not None or position in self.recorded.steps:
            raise self.mismatch(position, f"ctx.{name}()")
        return False, None

    def wait_at(self, position: int, kind: str, name: str | None, what: str) -> WaitState | None:
        """The recorded wait at ``position`` (``name`` ``None``: of that kind, any name)."""
        wait = self.recorded.waits.get(position)
        if wait is None and (position in self.recorded.steps or position in self.recorded.values):
            raise self.mismatch(position, what)
        if wait is not None and (wait.kind != kind or name not in (None, wait.name)):
            raise self.mismatch(position, what)
        return wait

    # --- the order rule and the steps in flight ----------------------------------------

    def check_order(self, kind: StepKind, name: str, position: int) -> None:
        """Refuse a compensable step after the point of no return, and a point of no return
        that would run alongside other steps (it could not be undone if they failed)."""
        if kind is StepKind.COMPENSABLE and self._forward_only_since is not None:
            raise PlanError(
                f"step {name!r} (#{position}) is compensable but comes after "
                f"{self._forward_only_since!r}, which cannot be compensated; compensable steps "
                f"must all come before the pivot"
            )
        if kind is not StepKind.COMPENSABLE:
            if self._in_flight:
                others = ", ".join(repr(n) for n in self._in_flight.values())
                raise PlanError(
                    f"step {name!r} (#{position}) is a point of no return but would run "
                    f"alongside {others}; await the other steps before the pivot"
                )
            self.passed_point_of_no_return(name)

    def passed_point_of_no_return(self, name: str) -> None:
        """From here on nothing compensable may run (a pivot, or a child past its own)."""
        if self._forward_only_since is None:
            self._forward_only_since = name

    def use(self, position: int, step: Step[..., Any]) -> None:
        """The body asks for ``step`` at ``position`` (with any call-site overrides)."""
        self._steps_used[position] = step

    def calling(self, position: int, name: str) -> None:
        """The step at ``position`` is being called now."""
        self._in_flight[position] = name

    def called(self, position: int) -> None:
        """The call at ``position`` has returned or failed."""
        self._in_flight.pop(position, None)

    def step_used(self, position: int) -> Step[..., Any] | None:
        """The step object the body called at ``position`` in this execution, if it did."""
        return self._steps_used.get(position)
