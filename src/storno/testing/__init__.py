"""Tools for testing code built on storno.

- :class:`VirtualClock` and :func:`advance`: retry backoffs, deadlines and timers without
  waiting.
- :class:`FaultInjector`: make steps and compensations fail, time out, or crash the worker
  at a chosen point; :func:`restart_worker` resumes after a :class:`SimulatedCrash`.
- :func:`check_failure_points`: run a saga once per failure point and check that every run
  ends completed or cleanly compensated.
- A pytest plugin (loaded automatically once storno is installed) with the fixtures
  ``storno_clock``, ``storno_app`` and ``storno_faults``.

See docs/testing.md.
"""

from storno.testing._check import (
    EffectsReader,
    FailurePointError,
    FailurePointReport,
    ScenarioOutcome,
    check_failure_points,
)
from storno.testing._clock import VirtualClock, advance
from storno.testing._inject import (
    FaultInjector,
    FaultRule,
    Injection,
    SimulatedCrash,
    restart_worker,
    restart_workers,
)

__all__ = [
    # time
    "VirtualClock",
    "advance",
    # faults
    "FaultInjector",
    "FaultRule",
    "Injection",
    "SimulatedCrash",
    "restart_worker",
    "restart_workers",
    # every failure point
    "check_failure_points",
    "FailurePointReport",
    "FailurePointError",
    "ScenarioOutcome",
    "EffectsReader",
]
