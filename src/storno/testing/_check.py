"""Run a saga once per failure point and check that it always ends consistent.

A clean run teaches the checker the saga's steps. Then, each in a fresh store, every step
fails before its call, every step's call lands and the worker dies before recording it, every
compensable step's answer is lost for good, and every compensation lands and the worker dies
before recording it. Each run must end ``completed`` with every effect of the clean run in
place exactly once, or ``compensated`` with every effect undone.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import tempfile
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storno._app import Storno
from storno._definitions import Step
from storno._errors import ConfigurationError
from storno._model import ENDED_STATUSES, RunStatus, StepKind
from storno._saga import Saga
from storno._views import RunInfo
from storno._worker import Worker
from storno.testing._clock import VirtualClock
from storno.testing._inject import FaultInjector, FaultRule, restart_worker
from storno.testing._waiting import Approve, WaitFeeder

__all__ = [
    "EffectsReader",
    "FailurePointError",
    "FailurePointReport",
    "ScenarioOutcome",
    "check_failure_points",
]

Effects = Iterable[Hashable] | Mapping[Hashable, int]
EffectsReader = Callable[[], Effects | Awaitable[Effects]]
"""Returns the effects now in place in the other systems: an iterable of hashable
descriptions (a multiset), or a mapping from description to a count that may go negative
(a refund without its charge)."""

_GOOD = (RunStatus.COMPLETED, RunStatus.COMPENSATED)
_WORKER_ID = "storno-failure-points"


@dataclass(frozen=True, slots=True)
class ScenarioOutcome:
    """One failure scenario: the faults injected, how the run ended, what it left behind."""

    name: str
    faults: tuple[str, ...]
    run_id: str
    status: RunStatus | None
    """How the run ended; ``None`` if it had not ended within the checker's timeout."""
    effects: dict[Hashable, int]
    """The change in effects the run left behind (zero counts left out)."""
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()
    info: RunInfo | None = field(default=None, repr=False, compare=False)
    """The run with its steps and history, to look at when the scenario failed."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        ended = self.status.value if self.status else "did not end"
        lines = [f"{mark} {self.name} -> {ended}"]
        lines += [f"       {p}" for p in self.problems]
        lines += [f"       ({n})" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class FailurePointReport:
    """What :func:`check_failure_points` tried and found."""

    saga: str
    steps: tuple[str, ...]
    baseline: dict[Hashable, int]
    """The effects of the clean run."""
    scenarios: tuple[ScenarioOutcome, ...]
    skipped: tuple[str, ...] = ()
    """Scenarios that could not be staged, with why."""

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.scenarios)

    @property
    def failures(self) -> list[ScenarioOutcome]:
        return [s for s in self.scenarios if not s.ok]

    def summary(self, *, only_failures: bool = False) -> str:
        shown = self.failures if only_failures else list(self.scenarios)
        head = (
            f"failure points of saga {self.saga!r} (steps: {', '.join(self.steps)}): "
            f"{len(self.scenarios)} scenarios, {len(self.failures)} failed"
        )
        lines = [head, *(s.describe() for s in shown)]
        lines += [f"skipped: {s}" for s in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def raise_for_failures(self) -> None:
        if not self.ok:
            raise FailurePointError(self)


class FailurePointError(AssertionError):
    """A failure scenario left a run inconsistent; ``.report`` has every scenario."""

    def __init__(self, report: FailurePointReport) -> None:
        super().__init__(report.summary(only_failures=True))
        self.report = report


@dataclass(frozen=True, slots=True)
class _Spot:
    """A step of the clean run."""

    position: int
    name: str
    kind: StepKind
    call: int
    label: str
    forward_only: bool  # after the point of no return
    bounded: bool  # its retry policy gives up at some point


@dataclass(slots=True)
class _Scenario:
    name: str
    rules: list[tuple[Callable[[FaultInjector], FaultRule], bool]]  # (add the rule, required)
    note_if_unreached: str | None = None


async def _read(effects: EffectsReader) -> Counter[Hashable]:
    value = effects()
    if inspect.isawaitable(value):
        value = await value
    if isinstance(value, Mapping):
        counts: Counter[Hashable] = Counter()
        for key, count in value.items():
            counts[key] += int(count)
        return counts
    return Counter(value)


async def _call(fn: Callable[[], object] | None) -> None:
    if fn is not None:
        result = fn()
        if inspect.isawaitable(result):
            await result


def _delta(before: Counter[Hashable], after: Counter[Hashable]) -> dict[Hashable, int]:
    change = Counter(after)
    change.subtract(before)
    return {k: v for k, v in change.items() if v}


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _show(effect: Hashable) -> str:
    text = repr(effect)
    return text if len(text) <= 200 else text[:197] + "..."


def _learn(app: Storno, info: RunInfo) -> list[_Spot]:
    refs = {
        e.position: e.data.get("ref")
        for e in info.history
        if e.type == "step_started" and e.position is not None
    }
    names = [s.name for s in info.steps]
    spots: list[_Spot] = []
    seen: Counter[str] = Counter()
    forward_only = False
    for s in info.steps:
        seen[s.name] += 1
        kind = StepKind(s.kind)
        try:
            declared: Step[..., Any] | None = app.find_step(s.name, refs.get(s.position))
        except ConfigurationError:
            declared = None
        if declared is not None:
            bounded = declared.retry.maximum_attempts is not None
        else:
            bounded = kind is not StepKind.RETRYABLE
        label = s.name if names.count(s.name) == 1 else f"{s.name}#{seen[s.name]}"
        spots.append(_Spot(s.position, s.name, kind, seen[s.name], label, forward_only, bounded))
        if kind is not StepKind.COMPENSABLE:
            forward_only = True
    return spots


def _scenarios(spots: list[_Spot]) -> tuple[list[_Scenario], list[str]]:
    scenarios: list[_Scenario] = []
    skipped: list[str] = []
    for i, spot in enumerate(spots):
        name, call = spot.name, spot.call
        nxt = spots[i + 1] if i + 1 < len(spots) else None

        def fail_next(faults: FaultInjector, nxt: _Spot | None = nxt) -> FaultRule:
            assert nxt is not None
            return faults.fail_terminally(nxt.name, call=nxt.call)

        def lands_then_crash(
            faults: FaultInjector, name: str = name, call: int = call
        ) -> FaultRule:
            return faults.crash(name, when="after_call", call=call)

        def later_attempts_time_out(
            faults: FaultInjector, name: str = name, call: int = call
        ) -> FaultRule:
            return faults.time_out(name, times=None, after=1, call=call)

        def fail_terminally(faults: FaultInjector, name: str = name, call: int = call) -> FaultRule:
            return faults.fail_terminally(name, call=call)

        def fail_once(faults: FaultInjector, name: str = name, call: int = call) -> FaultRule:
            return faults.fail(name, call=call)

        if not spot.forward_only:
            scenarios.append(
                _Scenario(f"{spot.label} fails before its call", [(fail_terminally, True)])
            )
        else:
            # After the point of no return a terminal failure parks the run by design; the
            # failure to survive there is a transient one.
            scenarios.append(
                _Scenario(f"{spot.label} fails once before its call", [(fail_once, True)])
            )
        scenarios.append(
            _Scenario(
                f"{spot.label} lands, then the worker dies before recording it",
                [(lands_then_crash, True)],
            )
        )
        if spot.kind is not StepKind.COMPENSABLE:
            continue
        # The answer is lost and every later attempt times out too: the step's outcome stays
        # unknown (unless its verify finds the call), and the run is compensated.
        if spot.bounded:
            rules: list[tuple[Callable[[FaultInjector], FaultRule], bool]] = [
                (lands_then_crash, True),
                (later_attempts_time_out, False),
            ]
            if nxt is not None:
                rules.append((fail_next, False))
            scenarios.append(_Scenario(f"{spot.label} lands, its answer is lost for good", rules))
        else:
            skipped.append(
                f"{spot.label} lands, its answer is lost for good: its retry policy never gives "
                f"up, so its outcome cannot stay unknown"
            )

        def crash_compensation(faults: FaultInjector, name: str = name) -> FaultRule:
            # Compensation runs latest first: this position is the first of its name to undo.
            return faults.crash_compensation(name, when="after_call", call=1)

        title = f"compensation of {spot.label} lands, then the worker dies before recording it"
        if nxt is not None:
            scenarios.append(_Scenario(title, [(fail_next, True), (crash_compensation, True)]))
        elif spot.bounded:
            scenarios.append(
                _Scenario(
                    title,
                    [
                        (lands_then_crash, True),
                        (later_attempts_time_out, False),
                        (crash_compensation, False),
                    ],
                    note_if_unreached=(
                        f"not reached: nothing runs after {spot.label} and its read-back found "
                        f"the call, so the run completed"
                    ),
                )
            )
        else:
            skipped.append(f"{title}: nothing after it can fail and its retries never give up")
    return scenarios, skipped


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60]


async def _drive(
    app: Storno,
    run_id: str,
    faults: FaultInjector,
    worker: Worker,
    timeout: float,
    feeder: WaitFeeder | None = None,
) -> tuple[RunStatus | None, Worker]:
    """Wait until the run ends, restarting the worker after every simulated crash, answering
    the run's signal and approval waits, and skipping virtual time to the wake time of a
    waiting run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    restarts = 0
    while True:
        record = await app.store.get_run(run_id)
        assert record is not None
        if record.status in ENDED_STATUSES:
            return record.status, worker
        if len(faults.crashes) > restarts:
            restarts += 1
            worker = await restart_worker(worker, grace=1.0)
            continue
        if (
            record.status is RunStatus.WAITING
            and feeder is not None
            and await feeder.feed(app, run_id)
        ):
            continue
        if (
            record.status is RunStatus.WAITING
            and record.wake_at is not None
            and isinstance(app.clock, VirtualClock)
            and app.clock.now() < record.wake_at
        ):
            app.clock.set(record.wake_at)
            worker.wake()
        if loop.time() > deadline:
            return None, worker
        await asyncio.sleep(0.002)


async def check_failure_points(
    saga: Saga[..., Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    effects: EffectsReader,
    reset: Callable[[], object] | None = None,
    folder: str | os.PathLike[str] | None = None,
    make_app: Callable[[str], Storno] | None = None,
    steps: Iterable[Step[..., Any]] = (),
    signals: Mapping[str, Any] | None = None,
    approve: Approve | None = None,
    timeout: float = 30.0,
    raise_on_failure: bool = True,
) -> FailurePointReport:
    """Run ``saga(*args, **kwargs)`` once cleanly, then once per failure point, and check
    that every run ends ``completed`` or ``compensated`` and leaves the other systems
    consistent.

    ``effects()`` (sync or async) reads the effects now in place in the other systems: a
    list of hashable descriptions in business terms (``("charged", "alice", 100)``, not an
    idempotency key), or a mapping to counts that may go negative. The checker compares
    what each run changed: a completed run must leave exactly what the clean run left (each
    effect once), a compensated run nothing at all. ``reset()`` (optional, sync or async)
    runs before every scenario.

    Each run gets a fresh SQLite file in ``folder`` (default: a temporary folder) and an app
    from ``make_app(url)``; the default is ``Storno(url, sagas=[saga], steps=steps,
    clock=VirtualClock())``, so retry backoffs take no time. Steps defined inside a function
    must be passed in ``steps`` so that a compensation resumed after a crash finds them.

    A saga that waits is answered once each wait has begun: ``signals`` maps a signal's name
    to the data to send, and ``approve`` answers ``ctx.wait_for_approval()`` (``True``
    approves, ``False`` rejects, a callable given the :class:`storno.RunInfo` decides).

    Returns the report; raises :class:`FailurePointError` (an ``AssertionError``) naming the
    failing scenarios unless ``raise_on_failure=False``.
    """
    call_kwargs = dict(kwargs or {})
    declared = list(steps)

    def default_app(url: str) -> Storno:
        return Storno(url, sagas=[saga], steps=declared, clock=VirtualClock())

    factory = make_app or default_app
    spots: list[_Spot] = []
    batch = uuid.uuid4().hex[:8]  # run ids (and so keys) differ from any earlier check's

    async def run(index: int, scenario: _Scenario | None, where: Path) -> ScenarioOutcome:
        await _call(reset)
        before = await _read(effects)
        title = scenario.name if scenario else "clean run"
        run_id = f"failure-point-{batch}-{index}"
        app = factory(f"sqlite:///{where / f'{index:02d}-{_slug(title)}.db'}")
        problems: list[str] = []
        notes: list[str] = []
        status: RunStatus | None = None
        info: RunInfo | None = None
        rules: list[tuple[FaultRule, bool]] = []
        with FaultInjector() as faults:
            for add, required in scenario.rules if scenario else []:
                rules.append((add(faults), required))
            async with app:
                worker = app.worker(worker_id=_WORKER_ID, poll_interval=0.05)
                await worker.start()
                try:
                    await app.start(saga.options(run_id=run_id), *args, **call_kwargs)
                    feeder = WaitFeeder(signals, approve)
                    status, worker = await _drive(app, run_id, faults, worker, timeout, feeder)
                    info = await app.describe(run_id)
                    if scenario is None and status is RunStatus.COMPLETED:
                        spots.extend(_learn(app, info))
                finally:
                    await worker.stop(grace=0.5)
        after = await _read(effects)
        delta = _delta(before, after)
        if status is None:
            state = info.status.value if info else "unknown"
            problems.append(f"did not end within {timeout:g}s; it is still {state}")
        elif status not in _GOOD:
            message = (info.error or {}).get("message", "") if info else ""
            problems.append(f"ended {status.value}: {message}".rstrip(": "))
        for rule, required in rules:
            if not rule.fired and required:
                problems.append(
                    f"the fault was never reached ({rule.description}): the run did not take "
                    f"the clean run's path"
                )
        if scenario and scenario.note_if_unreached and rules and not rules[-1][0].fired:
            notes.append(scenario.note_if_unreached)
        return ScenarioOutcome(
            title,
            tuple(r.description for r, _ in rules),
            run_id,
            status,
            delta,
            tuple(problems),
            tuple(notes),
            info,
        )

    with tempfile.TemporaryDirectory(prefix="storno-failure-points-") as scratch:
        where = Path(folder) if folder is not None else Path(scratch)
        where.mkdir(parents=True, exist_ok=True)
        clean = await run(0, None, where)
        if clean.status is not RunStatus.COMPLETED or clean.info is None:
            raise AssertionError(
                f"the clean run of saga {saga.name!r} must complete before failures can be "
                f"checked; it {clean.status.value if clean.status else 'did not end'}: "
                f"{'; '.join(clean.problems) or (clean.info and clean.info.error)}"
            )
        baseline = clean.effects
        path = [(s.position, s.name) for s in clean.info.steps]
        scenarios, skipped = _scenarios(spots)
        outcomes: list[ScenarioOutcome] = []
        for index, scenario in enumerate(scenarios, 1):
            outcome = await run(index, scenario, where)
            outcomes.append(_judge(outcome, baseline, path))
    report = FailurePointReport(
        saga.name,
        tuple(s.label for s in spots),
        baseline,
        tuple(outcomes),
        tuple(skipped),
    )
    if raise_on_failure:
        report.raise_for_failures()
    return report


def _judge(
    outcome: ScenarioOutcome, baseline: dict[Hashable, int], path: list[tuple[int, str]]
) -> ScenarioOutcome:
    """Add the problems with what the run left behind."""
    problems = list(outcome.problems)
    notes = list(outcome.notes)
    delta = outcome.effects
    if outcome.status is RunStatus.COMPENSATED:
        for effect, count in delta.items():
            if count > 0:
                problems.append(f"left in place after compensation: {_show(effect)} x{count}")
            else:
                problems.append(
                    f"undone {_times(-count)} more than done: {_show(effect)} ({count})"
                )
    elif outcome.status is RunStatus.COMPLETED and outcome.info is not None:
        same_path = [(s.position, s.name) for s in outcome.info.steps] == path
        if not same_path:
            notes.append("the saga took another path than the clean run")
        for effect in sorted(set(delta) | set(baseline), key=repr):
            got, want = delta.get(effect, 0), baseline.get(effect, 0)
            if got == want:
                continue
            if got < 0:
                problems.append(f"undone without being done: {_show(effect)} ({got})")
            elif same_path and got < want:
                problems.append(
                    f"missing: {_show(effect)} (in place {_times(got) if got else 'never'}, "
                    f"the clean run left it {_times(want)})"
                )
            elif got > max(want, 0 if same_path else 1):
                if want:
                    problems.append(
                        f"in place {_times(got)}, the clean run left it {_times(want)}: "
                        f"{_show(effect)}"
                    )
                else:
                    problems.append(f"not left by the clean run: {_show(effect)} x{got}")
    return ScenarioOutcome(
        outcome.name,
        outcome.faults,
        outcome.run_id,
        outcome.status,
        outcome.effects,
        tuple(problems),
        tuple(notes),
        outcome.info,
    )
