"""Tools for testing code built on storno.

- :class:`VirtualClock` and :func:`advance`: retry backoffs, deadlines and timers without
  waiting.
- :class:`FaultInjector`: make steps and compensations fail, time out, or crash the worker
  at a chosen point; :func:`restart_worker` resumes after a :class:`SimulatedCrash`.
- :func:`check_failure_points`: run a saga once per failure point and check that every run
  ends completed or cleanly compensated.
- :class:`FakeProvider`: a third-party API with idempotency keys, a durable SQLite ledger and
  faults from a :class:`Schedule` (500s and 429s before the key check, lost answers, late
  writes, outages, declines); :func:`check_fault_schedules` runs a saga under many seeded
  schedules and checks the ledger's invariants.
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
from storno.testing._faultplan import Crash, Fault, Outage, Schedule, random_schedule
from storno.testing._inject import (
    FaultInjector,
    FaultRule,
    Injection,
    SimulatedCrash,
    restart_worker,
    restart_workers,
)
from storno.testing._provider import (
    Declined,
    Effect,
    FakeProvider,
    ProviderConflict,
    ProviderError,
    ProviderThrottled,
    ProviderTimeout,
    ProviderUnavailable,
)
from storno.testing._schedules import (
    FaultScheduleError,
    FaultScheduleReport,
    ScheduleOutcome,
    check_fault_schedules,
)
from storno.testing._waiting import Approve

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
    "Approve",
    # a fake provider and many fault schedules
    "FakeProvider",
    "Effect",
    "ProviderError",
    "ProviderUnavailable",
    "ProviderThrottled",
    "ProviderTimeout",
    "ProviderConflict",
    "Declined",
    "Schedule",
    "Fault",
    "Outage",
    "Crash",
    "random_schedule",
    "check_fault_schedules",
    "FaultScheduleReport",
    "FaultScheduleError",
    "ScheduleOutcome",
]
