"""Run a saga under many fault schedules at a :class:`FakeProvider` and check its ledger.

A clean run teaches the check which operations the saga calls and in which steps. Then
every schedule (drawn from a seed, or given) gets a run of its own; the runs go in batches,
concurrently, on one application timed by a :class:`VirtualClock`. After each batch the
provider's late writes land, and each run's ledger must satisfy the invariants below.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storno._app import Storno
from storno._definitions import Step
from storno._model import ENDED_STATUSES, Event, EventType, RunRecord, RunStatus, StepKind
from storno._saga import Saga
from storno._views import RunInfo
from storno._worker import Worker
from storno.testing._clock import VirtualClock
from storno.testing._faultplan import Schedule, random_schedule
from storno.testing._inject import FaultInjector, restart_worker
from storno.testing._provider import Effect, FakeProvider
from storno.testing._waiting import Approve, WaitFeeder

__all__ = ["FaultScheduleError", "FaultScheduleReport", "ScheduleOutcome", "check_fault_schedules"]

Draw = Callable[[random.Random, Sequence[tuple[str, str]], Sequence[str]], Schedule]
"""Makes one schedule from a seeded ``Random``, the (operation, kind) pairs the clean run
called and the names of its steps."""

_LEASE = 365 * 24 * 3600.0  # virtual seconds: backoffs of other runs must not expire leases
_WORKER_ID = "storno-fault-schedules"
_SHOWN = 10  # failures described in full in a summary


@dataclass(frozen=True, slots=True)
class ScheduleOutcome:
    """One schedule's run: how it ended and what the provider's ledger holds for it."""

    index: int
    schedule: Schedule
    run_id: str
    status: RunStatus | None
    """How the run ended; ``None`` if it had not ended within the check's timeout."""
    problems: tuple[str, ...]
    effects: tuple[Effect, ...] = field(repr=False)
    info: RunInfo | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        ended = self.status.value if self.status else "did not end"
        lines = [f"{mark} #{self.index} ({self.schedule.describe()}) -> {ended}"]
        lines += [f"       {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class FaultScheduleReport:
    """What :func:`check_fault_schedules` ran and found."""

    saga: str
    seed: int | None
    """The seed the schedules were drawn from (``None`` when they were given)."""
    outcomes: tuple[ScheduleOutcome, ...]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def failures(self) -> list[ScheduleOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ends(self) -> Counter[str]:
        """How many runs ended in each state (``"did not end"`` for stuck ones)."""
        return Counter(o.status.value if o.status else "did not end" for o in self.outcomes)

    def reproduce(self, outcome: ScheduleOutcome) -> str:
        """How to run one schedule again on its own."""
        if self.seed is None:
            return f"schedules=[{outcome.schedule!r}]"
        return f"seed={self.seed}, only=[{outcome.index}]"

    def summary(self) -> str:
        ends = ", ".join(f"{k} {v}" for k, v in sorted(self.ends.items()))
        drawn = f" (seed {self.seed})" if self.seed is not None else ""
        lines = [
            f"fault schedules of saga {self.saga!r}{drawn}: {len(self.outcomes)} schedules, "
            f"{len(self.failures)} failed; ends: {ends}"
        ]
        failures = self.failures
        lines += [f.describe() for f in failures[:_SHOWN]]
        if len(failures) > _SHOWN:
            lines.append(f"... and {len(failures) - _SHOWN} more")
        if failures:
            lines.append(
                f"reproduce one: check_fault_schedules(..., {self.reproduce(failures[0])})"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def raise_for_failures(self) -> None:
        if not self.ok:
            raise FaultScheduleError(self)


class FaultScheduleError(AssertionError):
    """A schedule left the provider's ledger inconsistent; ``.report`` has every schedule."""

    def __init__(self, report: FaultScheduleReport) -> None:
        super().__init__(report.summary())
        self.report = report


async def check_fault_schedules(
    saga: Saga[..., Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    provider: FakeProvider,
    schedules: int | Iterable[Schedule] = 100,
    seed: int | None = None,
    only: Iterable[int] | None = None,
    draw: Draw | None = None,
    crash_rate: float = 0.1,
    lost_answers: bool = True,
    steps: Iterable[Step[..., Any]] = (),
    signals: Mapping[str, Any] | None = None,
    approve: Approve | None = None,
    folder: str | os.PathLike[str] | None = None,
    make_app: Callable[[str], Storno] | None = None,
    batch: int = 100,
    timeout: float = 60.0,
    raise_on_failure: bool = True,
) -> FaultScheduleReport:
    """Run ``saga(*args, **kwargs)`` once per fault schedule and check the invariants of
    ``provider``'s ledger for every run:

    - no forward effect applied twice (one effect per step position and operation);
    - a completed run has every effect of the clean run exactly once, and nothing undone;
    - a compensated run has every applied compensable effect undone exactly once;
    - no run is compensated (nothing is undone) once a pivot, retryable or noncompensable
      effect of it landed;
    - a run ends ``needs_attention`` only when a step at or after its point of no return
      did not complete (its outcome unknown, or it failed), and nothing of it was undone;
      ``compensation_failed`` (a dead letter an operator sees, nothing lost) is accepted,
      and counted in :attr:`FaultScheduleReport.ends`;
    - every run ends within ``timeout`` seconds (real time, per batch of ``batch`` runs).

    ``schedules`` is a number of schedules to draw (from ``seed``; a random one, printed in
    the report, if not given) or the schedules themselves. ``only`` runs just those indexes
    of the drawn schedules (to reproduce one). ``draw(rng, operations, steps)`` replaces the
    default :func:`~storno.testing.random_schedule` (which uses ``crash_rate`` and
    ``lost_answers``). ``signals`` and ``approve`` answer waits as in
    :func:`~storno.testing.check_failure_points`.

    The app is ``make_app(url)`` on a SQLite file in ``folder`` (default: a temporary
    folder); the default is ``Storno(url, sagas=[saga], steps=steps, clock=VirtualClock(),
    lease_seconds=<a year>)``. Returns the report; raises :class:`FaultScheduleError` (an
    ``AssertionError``) unless ``raise_on_failure=False``.
    """
    call_kwargs = dict(kwargs or {})
    declared = list(steps)
    tag = uuid.uuid4().hex[:8]  # run ids (so keys and ledger rows) differ from any other check

    def default_app(url: str) -> Storno:
        return Storno(url, sagas=[saga], steps=declared, clock=VirtualClock(), lease_seconds=_LEASE)

    factory = make_app or default_app
    given = None if isinstance(schedules, int) else list(schedules)
    if given is None and seed is None:
        seed = random.SystemRandom().randrange(2**32)

    with tempfile.TemporaryDirectory(prefix="storno-fault-schedules-") as scratch:
        where = Path(folder) if folder is not None else Path(scratch)
        where.mkdir(parents=True, exist_ok=True)
        app = factory(f"sqlite:///{where / f'fault-schedules-{tag}.db'}?synchronous=normal")
        feeder = WaitFeeder(signals, approve)
        runner = _Runner(app, saga, args, call_kwargs, provider, feeder, max(batch, 1))
        async with app:
            try:
                baseline, info = await runner.clean(f"{tag}-clean", timeout)
                operations = _operations(baseline)
                names = list(dict.fromkeys(s.name for s in info.steps if s.child_run_id is None))
                if given is not None:
                    plan = list(enumerate(given))
                else:
                    assert isinstance(schedules, int)
                    assert seed is not None
                    indexes = sorted(set(only)) if only is not None else range(schedules)
                    make = draw or _default_draw(crash_rate, lost_answers)
                    plan = [
                        (i, make(random.Random(f"{seed}:{i}"), operations, names)) for i in indexes
                    ]
                slots = {(e.position, e.op) for e in baseline if e.applied}
                path = [(s.position, s.name) for s in info.steps]
                outcomes: list[ScheduleOutcome] = []
                for start in range(0, len(plan), max(batch, 1)):
                    chunk = plan[start : start + max(batch, 1)]
                    ran = await runner.batch(tag, chunk, timeout)
                    provider.land_pending()
                    for index, schedule, run_id, status, run_info in ran:
                        effects = tuple(provider.ledger(run_id))
                        problems = _judge(status, run_info, effects, slots, path, timeout)
                        outcomes.append(
                            ScheduleOutcome(
                                index, schedule, run_id, status, problems, effects, run_info
                            )
                        )
            finally:
                await runner.stop()
    report = FaultScheduleReport(saga.name, None if given is not None else seed, tuple(outcomes))
    if raise_on_failure:
        report.raise_for_failures()
    return report


def _default_draw(crash_rate: float, lost_answers: bool) -> Draw:
    def draw(
        rng: random.Random, operations: Sequence[tuple[str, str]], steps: Sequence[str]
    ) -> Schedule:
        return random_schedule(
            rng, operations, steps, crash_rate=crash_rate, lost_answers=lost_answers
        )

    return draw


def _operations(baseline: Sequence[Effect]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((e.op, e.kind.value) for e in baseline))


class _Runner:
    """Starts runs in batches on one worker and drives them to their ends."""

    def __init__(
        self,
        app: Storno,
        saga: Saga[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        provider: FakeProvider,
        feeder: WaitFeeder,
        concurrency: int,
    ) -> None:
        self.app, self.saga, self.args, self.kwargs = app, saga, args, kwargs
        self.concurrency = concurrency
        self.provider = provider
        self.feeder = feeder
        self.worker: Worker | None = None

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop(grace=1.0)
            self.worker = None

    async def clean(self, run_id: str, timeout: float) -> tuple[list[Effect], RunInfo]:
        """The run without faults: it must complete; returns its ledger and its steps."""
        ((_, _, _, status, info),) = await self.batch("", [(0, Schedule())], timeout, run_id)
        if status is not RunStatus.COMPLETED:
            error = info.error if info else None
            raise AssertionError(
                f"the clean run of saga {self.saga.name!r} must complete before faults can be "
                f"checked; it {status.value if status else 'did not end'}: {error}"
            )
        assert info is not None
        return self.provider.ledger(run_id), info

    async def batch(
        self,
        tag: str,
        plan: Sequence[tuple[int, Schedule]],
        timeout: float,
        run_id: str | None = None,
    ) -> list[tuple[int, Schedule, str, RunStatus | None, RunInfo]]:
        app = self.app
        ids = [run_id or f"{tag}-{index}" for index, _ in plan]
        with FaultInjector() as faults:
            self.worker = self.worker or app.worker(
                worker_id=_WORKER_ID, concurrency=self.concurrency, poll_interval=0.05
            )
            if not self.worker.running:
                await self.worker.start()
            for rid, (_, schedule) in zip(ids, plan, strict=True):
                self.provider.schedule(schedule, run_id=rid)
                for crash in schedule.crashes:
                    faults.crash(
                        crash.step, when=crash.when, after=crash.attempt - 1, run_id=rid, call=1
                    )
            for rid in ids:
                await app.start(self.saga.options(run_id=rid), *self.args, **self.kwargs)
            statuses = await self._drive(ids, faults, timeout)
        out = []
        for rid, (index, schedule) in zip(ids, plan, strict=True):
            info = await app.describe(rid)
            out.append((index, schedule, rid, statuses.get(rid), info))
        return out

    async def _drive(
        self, ids: list[str], faults: FaultInjector, timeout: float
    ) -> dict[str, RunStatus]:
        """Wait until every run ended (or ``timeout`` passed), restarting the worker after
        simulated crashes, answering waits, and skipping virtual time for sleeping runs."""
        app = self.app
        clock = app.clock
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ended: dict[str, RunStatus] = {}
        waiting: dict[str, float | None] = {}
        touched: set[str] = set(ids)
        nudge = asyncio.Event()

        def listen(record: RunRecord, events: list[Event]) -> None:
            if any(e.type in _STOPS for e in events):
                touched.add(record.run_id)
                nudge.set()

        app.add_listener(listen)
        restarts = 0
        try:
            while len(ended) < len(ids) and loop.time() < deadline:
                if len(faults.crashes) > restarts and self.worker is not None:
                    restarts = len(faults.crashes)
                    self.worker = await restart_worker(self.worker, grace=timeout / 4)
                    continue
                nudge.clear()
                check, touched = touched, set()
                for run_id in check:
                    record = await app.store.get_run(run_id)
                    if record is None or run_id in ended:
                        continue
                    waiting.pop(run_id, None)
                    if record.status in ENDED_STATUSES:
                        ended[run_id] = record.status
                    elif record.status is RunStatus.WAITING:
                        waiting[run_id] = record.wake_at
                fed = False
                for run_id in list(waiting):
                    if await self.feeder.feed(app, run_id):
                        fed = True
                        touched.add(run_id)
                due = [w for w in waiting.values() if w is not None]
                if not fed and due and isinstance(clock, VirtualClock):
                    if clock.now() < min(due):
                        clock.set(min(due))
                    for worker in app.workers:
                        worker.wake()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(nudge.wait(), 0.2)
                if not nudge.is_set():  # nothing said for a while: look at every run again
                    touched |= set(ids) - set(ended)
        finally:
            app.remove_listener(listen)
        return ended


_STOPS = frozenset(
    {
        EventType.RUN_COMPLETED,
        EventType.RUN_COMPENSATED,
        EventType.RUN_CANCELLED,
        EventType.RUN_NEEDS_ATTENTION,
        EventType.RUN_COMPENSATION_FAILED,
        EventType.RUN_WAITING,
    }
)


def _judge(
    status: RunStatus | None,
    info: RunInfo | None,
    effects: Sequence[Effect],
    slots: set[tuple[int, str]],
    path: list[tuple[int, str]],
    timeout: float,
) -> tuple[str, ...]:
    """The invariants a run's ledger and end break."""
    problems: list[str] = []
    applied = [e for e in effects if e.applied]

    def show(e: Effect) -> str:
        return f"{e.op} of step #{e.position} (key {e.key[-12:]})"

    for (position, op), n in sorted(Counter((e.position, e.op) for e in applied).items()):
        if n > 1:
            problems.append(f"{op} of step #{position} applied {n} times, under different keys")
    problems += [f"{show(e)} undone {e.undone} times" for e in applied if e.undone > 1]
    undone = [e for e in applied if e.undone]
    landed_past = [e for e in applied if e.kind is not StepKind.COMPENSABLE]
    if undone and landed_past:
        problems.append(
            f"compensated although its {landed_past[0].kind.value} effect "
            f"{show(landed_past[0])} had landed"
        )
    if status is None:
        state = info.status.value if info else "unknown"
        problems.append(f"did not end within {timeout:g}s; it is still {state}")
    elif status is RunStatus.COMPLETED:
        problems += [f"undone in a completed run: {show(e)}" for e in undone]
        if info is not None and [(s.position, s.name) for s in info.steps] == path:
            have = {(e.position, e.op) for e in applied}
            problems += [
                f"missing from a completed run: {op} of step #{p}" for p, op in sorted(slots - have)
            ]
    elif status in (RunStatus.COMPENSATED, RunStatus.CANCELLED):
        problems += [
            f"left in place after compensation: {show(e)}"
            for e in applied
            if e.kind is StepKind.COMPENSABLE and not e.undone
        ]
        if landed_past and not undone:
            problems.append(
                f"compensated although its {landed_past[0].kind.value} effect "
                f"{show(landed_past[0])} had landed"
            )
    elif status is RunStatus.NEEDS_ATTENTION:
        problems += [f"undone, then parked: {show(e)}" for e in undone]
        if info is not None and not _parked_past_the_point_of_no_return(info):
            message = (info.error or {}).get("message", "")
            problems.append(
                f"parked in needs_attention though every step at or after its point of no "
                f"return completed (or none may have applied): {message}"
            )
    elif status is not RunStatus.COMPENSATION_FAILED:
        problems.append(f"ended {status.value}")
    return tuple(problems)


def _parked_past_the_point_of_no_return(info: RunInfo) -> bool:
    """A step at or after the run's point of no return did not complete."""
    past = False
    for s in sorted(info.steps, key=lambda s: s.position):
        may_have_applied = s.status == "completed" or s.outcome_unknown or s.status == "unknown"
        if s.kind != StepKind.COMPENSABLE.value and may_have_applied:
            past = True
        if past and s.status != "completed":
            return True
    return False
