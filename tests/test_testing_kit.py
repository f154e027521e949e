"""storno.testing: the virtual clock, fault injection, the failure-point checker, the pytest
plugin's fixtures, and the examples of docs/testing.md."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import storno
from conftest import wait_for
from storno import _faults
from storno.testing import (
    FailurePointError,
    FaultInjector,
    SimulatedCrash,
    VirtualClock,
    advance,
    check_failure_points,
    restart_worker,
    restart_workers,
)

ROOT = Path(__file__).resolve().parent.parent
FAST = storno.RetryPolicy(initial_interval=0.001, maximum_interval=0.01, maximum_attempts=5)
NEW_YEAR = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file: the kit is backend-neutral, these tests pin the embedded default."""
    return f"sqlite:///{tmp_path / 'storno.db'}"


def history_types(info: storno.RunInfo) -> list[str]:
    return [e.type for e in info.history]


def step_info(info: storno.RunInfo, name: str) -> storno.StepInfo:
    return next(s for s in info.steps if s.name == name)


# --- the virtual clock ---------------------------------------------------------------------


async def test_virtual_clock_moves_only_when_told() -> None:
    clock = VirtualClock(NEW_YEAR)
    assert clock.now() == NEW_YEAR.timestamp()
    assert clock.datetime() == NEW_YEAR
    assert clock.advance(90) == NEW_YEAR.timestamp() + 90
    clock.advance(timedelta(days=1))
    assert clock.datetime() == NEW_YEAR + timedelta(days=1, seconds=90)
    before = time.monotonic()
    await clock.sleep(3600)
    assert time.monotonic() - before < 1
    assert clock.datetime() == NEW_YEAR + timedelta(days=1, hours=1, seconds=90)
    assert clock.sleeps == [3600]
    clock.set(NEW_YEAR + timedelta(days=2))
    assert clock.datetime() == NEW_YEAR + timedelta(days=2)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.set(NEW_YEAR)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="naive datetime"):
        VirtualClock(datetime(2030, 1, 1))  # naive: refused
    assert abs(VirtualClock().now() - time.time()) < 5  # default: the real time


async def test_retry_backoff_of_minutes_takes_no_real_time(sqlite_url: str) -> None:
    slow = storno.RetryPolicy(
        initial_interval=60, backoff_coefficient=2, maximum_interval=3600, jitter=0
    )

    @storno.step(kind="retryable", retry=slow)
    def flaky(ctx: storno.StepContext) -> int:
        if ctx.attempt < 5:
            raise ConnectionError("API down")
        return ctx.attempt

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(flaky)

    clock = VirtualClock(NEW_YEAR)
    started = time.monotonic()
    async with storno.Storno(sqlite_url, sagas=[s], clock=clock) as app, app.worker():
        assert await app.run(s) == 5
    assert time.monotonic() - started < 5
    assert clock.sleeps == [60, 120, 240, 480]  # 15 minutes of backoff, skipped
    assert clock.now() >= NEW_YEAR.timestamp() + 900


async def test_ctx_now_is_virtual_time(sqlite_url: str) -> None:
    @storno.saga
    async def s(ctx: storno.SagaContext) -> datetime:
        return ctx.now()

    clock = VirtualClock(NEW_YEAR)
    async with storno.Storno(sqlite_url, sagas=[s], clock=clock) as app, app.worker():
        assert await app.run(s) == NEW_YEAR
        clock.advance(timedelta(days=3))
        assert await app.run(s) == NEW_YEAR + timedelta(days=3)


async def test_run_deadline_expires_after_advance(sqlite_url: str) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()
    undone: list[str] = []

    @storno.step(compensate=lambda ctx: undone.append("hold"))
    def hold(ctx: storno.StepContext) -> str:
        return "held"

    @storno.step(compensate=lambda ctx: undone.append("wait"))
    async def wait_for_partner(ctx: storno.StepContext) -> str:
        entered.set()
        await gate.wait()
        return "answered"

    @storno.step(kind="pivot")
    def confirm(ctx: storno.StepContext) -> None:
        raise AssertionError("the deadline passed: must not run")

    @storno.saga(timeout=60)
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(hold)
        await ctx.step(wait_for_partner)
        await ctx.step(confirm)

    clock = VirtualClock(NEW_YEAR)
    async with storno.Storno(sqlite_url, sagas=[s], clock=clock) as app, app.worker():
        handle = await app.start(s)
        await asyncio.wait_for(entered.wait(), 10)
        await advance(app, timedelta(minutes=2))
        gate.set()
        with pytest.raises(storno.RunCompensatedError, match="run deadline"):
            await handle.result(timeout=10)
    assert undone == ["wait", "hold"]


async def test_advance_skips_a_durable_sleep_of_days(sqlite_url: str) -> None:
    @storno.step(kind="retryable")
    def remind(ctx: storno.StepContext, who: str) -> str:
        return f"reminded {who}"

    @storno.saga
    async def trial(ctx: storno.SagaContext, who: str) -> str:
        await ctx.sleep(timedelta(days=14))
        return await ctx.step(remind, who)

    clock = VirtualClock(NEW_YEAR)
    async with storno.Storno(sqlite_url, sagas=[trial], clock=clock) as app, app.worker():
        handle = await app.start(trial, "ada")
        await wait_for(lambda: is_waiting(handle))
        await advance(app, timedelta(days=13))
        record = await app.store.get_run(handle.run_id)
        assert record is not None and record.wake_at == clock.now() + 86400  # not due yet
        started = time.monotonic()
        await advance(app, timedelta(days=1))
        assert await handle.result(timeout=5) == "reminded ada"
        assert time.monotonic() - started < 2  # claimed on advance, not at a later poll
        info = await handle.describe()
    fired = next(e for e in info.history if e.type == "timer_fired")
    assert fired.at == (NEW_YEAR + timedelta(days=14)).timestamp()


async def is_waiting(handle: storno.RunHandle[Any]) -> bool:
    return await handle.status() is storno.RunStatus.WAITING


async def test_advance_wakes_workers_so_an_expired_lease_is_taken_at_once(sqlite_url: str) -> None:
    calls: list[str] = []

    @storno.step(kind="pivot")
    def charge(ctx: storno.StepContext) -> str:
        calls.append(ctx.idempotency_key)
        return "ch-1"

    @storno.saga
    async def s(ctx: storno.SagaContext) -> str:
        return await ctx.step(charge)

    clock = VirtualClock(NEW_YEAR)
    async with storno.Storno(sqlite_url, sagas=[s], clock=clock, lease_seconds=30) as app:
        with FaultInjector() as faults:
            faults.crash(charge, when="after_call")
            # Polls only once a minute: only advance()'s wake-up can make it claim in time.
            async with app.worker(poll_interval=60):
                handle = await app.start(s)
                await faults.wait_for_crash()
                await asyncio.sleep(0.05)
                assert await handle.status() is storno.RunStatus.RUNNING  # lease still held
                await advance(app, 31)
                assert await handle.result(timeout=5) == "ch-1"
    assert len(calls) == 2 and calls[0] == calls[1]  # retried under the same key


async def test_advance_needs_a_virtual_clock(sqlite_url: str) -> None:
    async with storno.Storno(sqlite_url) as app:
        with pytest.raises(TypeError, match="VirtualClock"):
            await advance(app, 1)


# --- fault injection -----------------------------------------------------------------------


def shop(
    calls: list[tuple[str, str]], verify: bool = False
) -> tuple[storno.Saga[..., list[str]], list[storno.Step[..., str]]]:
    """reserve (compensable) -> charge (pivot); every call and undo lands in ``calls``.

    Also returns the steps: they are made inside a function, so an app must be given them
    for a compensation resumed from history alone to find them."""
    provider: dict[str, str] = {}

    def find(ctx: storno.StepContext, item: str) -> object:
        return provider.get(ctx.idempotency_key, storno.NOT_APPLIED)

    @storno.step(retry=FAST, compensation_retry=FAST)
    def reserve(ctx: storno.StepContext, item: str) -> str:
        calls.append(("reserve", ctx.idempotency_key))
        provider.setdefault(ctx.idempotency_key, f"r-{item}")
        return provider[ctx.idempotency_key]

    @reserve.compensation
    def release(ctx: storno.CompensationContext[str], item: str) -> None:
        calls.append(("release", ctx.idempotency_key))

    if verify:
        reserve.verifier(find)

    @storno.step(kind="pivot", retry=FAST)
    def charge(ctx: storno.StepContext, item: str) -> str:
        calls.append(("charge", ctx.idempotency_key))
        return f"c-{item}"

    @storno.saga
    async def buy(ctx: storno.SagaContext, item: str) -> list[str]:
        return [await ctx.step(reserve, item), await ctx.step(charge, item)]

    return buy, [reserve, charge]


async def test_fail_makes_the_first_attempts_fail_transiently(sqlite_url: str) -> None:
    calls: list[tuple[str, str]] = []
    buy, steps = shop(calls)
    async with storno.Storno(sqlite_url, sagas=[buy], steps=steps) as app, app.worker():
        with FaultInjector() as faults:
            rule = faults.fail("reserve", times=2)
            handle = await app.start(buy, "lamp")
            assert await handle.result(timeout=10) == ["r-lamp", "c-lamp"]
        info = await handle.describe()
    assert rule.fired == 2
    assert step_info(info, "reserve").attempts == 3
    failed = [e for e in info.history if e.type == "attempt_failed"]
    assert [e.data["attempt"] for e in failed] == [1, 2]
    assert all(e.data["error"]["type"] == "ConnectionError" for e in failed)
    assert "injected: transient failure of step 'reserve'" in failed[0].data["error"]["message"]
    assert [i.attempt for i in faults.injections] == [1, 2]
    assert [name for name, _ in calls] == ["reserve", "charge"]  # failed before the call


async def test_fail_terminally_ends_the_forward_path(sqlite_url: str) -> None:
    calls: list[tuple[str, str]] = []
    buy, steps = shop(calls)
    async with storno.Storno(sqlite_url, sagas=[buy], steps=steps) as app, app.worker():
        with FaultInjector() as faults:
            faults.fail_terminally("charge")
            handle = await app.start(buy, "lamp")
            with pytest.raises(storno.RunCompensatedError, match="injected: terminal failure"):
                await handle.result(timeout=10)
        info = await handle.describe()
    assert step_info(info, "charge").attempts == 1
    assert [name for name, _ in calls] == ["reserve", "release"]


async def test_time_out_records_an_unknown_outcome_read_back_then_retried(sqlite_url: str) -> None:
    calls: list[tuple[str, str]] = []
    buy, steps = shop(calls, verify=True)
    async with storno.Storno(sqlite_url, sagas=[buy], steps=steps) as app, app.worker():
        with FaultInjector() as faults:
            faults.time_out("reserve")
            handle = await app.start(buy, "lamp")
            assert await handle.result(timeout=10) == ["r-lamp", "c-lamp"]
        info = await handle.describe()
    reserve = step_info(info, "reserve")
    assert (reserve.attempts, reserve.verified) == (2, [False])  # read back: not applied
    failed = next(e for e in info.history if e.type == "attempt_failed")
    assert failed.data["outcome_unknown"] is True
    assert failed.data["error"]["type"] == "TimeoutError"


async def test_time_out_without_verify_retries_under_the_same_key(sqlite_url: str) -> None:
    calls: list[tuple[str, str]] = []
    buy, steps = shop(calls)
    async with storno.Storno(sqlite_url, sagas=[buy], steps=steps) as app, app.worker():
        with FaultInjector() as faults:
            faults.time_out("charge", times=2)
            handle = await app.start(buy, "lamp")
            assert await handle.result(timeout=10) == ["r-lamp", "c-lamp"]
        info = await handle.describe()
    assert step_info(info, "charge").attempts == 3
    assert history_types(info).count("attempt_failed") == 2
    assert [e.data["outcome_unknown"] for e in info.history if e.type == "attempt_failed"] == [
        True,
        True,
    ]


async def test_crash_before_call_then_restart_resumes_without_a_second_call(
    sqlite_url: str,
) -> None:
    calls: list[tuple[str, str]] = []
    buy, steps = shop(calls, verify=True)
    async with storno.Storno(sqlite_url, sagas=[buy], steps=steps) as app:
        with FaultInjector() as faults:
            faults.crash("reserve", when="before_call")
            worker = app.worker(worker_id="w1")
            await worker.start()
            handle = await app.start(buy, "lamp")
            crash = await faults.wait_for_crash()
            assert crash.point == "step.started" and crash.run_id == handle.run_id
            assert isinstance(crash.error, SimulatedCrash)
            assert calls == []  # died before the call
            assert await handle.status() is storno.RunStatus.RUNNING
            worker = await restart_worker(worker)
            assert worker.id == "w1"
            assert await handle.result(timeout=10) == ["r-lamp", "c-lamp"]
        info = await handle.describe()
    types = history_types(info)
    assert "run_resumed" in types and "outcome_unknown" in types
    reserve = step_info(info, "reserve")
    assert (reserve.attempts, reserve.verified) == (2, [False])
    assert [name for name, _ in calls] == ["reserve", "charge"]


async def test_crash_after_call_then_restart_repeats_the_call_under_its_key(
    sqlite_url: str,
) -> None:
    calls: list[tuple[str, str]] = []
    buy, steps = shop(calls)
    async with storno.Storno(sqlite_url, sagas=[buy], steps=steps) as app:
        with FaultInjector() as faults:
            faults.crash("reserve", when="after_call")
            async with app.worker(worker_id="w1"):
                handle = await app.start(buy, "lamp")
                crash = await faults.wait_for_crash()
                assert crash.point == "step.returned"
                assert [name for name, _ in calls] == ["reserve"]  # the call landed
                await restart_workers(app)
                assert await handle.result(timeout=10) == ["r-lamp", "c-lamp"]
        info = await handle.describe()
    assert [name for name, _ in calls] == ["reserve", "reserve", "charge"]
    assert calls[0][1] == calls[1][1]  # the same idempotency key: the provider can dedupe
    unknown = [e for e in info.history if e.type == "outcome_unknown"]
    assert [e.data["attempt"] for e in unknown] == [1]
    assert step_info(info, "reserve").attempts == 2


async def test_fail_compensation_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    for times, status in [(2, storno.RunStatus.COMPENSATED), (None, None)]:
        calls: list[tuple[str, str]] = []
        buy, steps = shop(calls)
        url = f"sqlite:///{tmp_path / f'comp-{times}.db'}"
        async with storno.Storno(url, sagas=[buy], steps=steps) as app, app.worker():
            with FaultInjector() as faults:
                faults.fail_terminally("charge")
                rule = faults.fail_compensation("reserve", times=times)
                handle = await app.start(buy, "lamp")
                with pytest.raises(storno.RunFailedError):
                    await handle.result(timeout=10)
            info = await handle.describe()
        compensation = step_info(info, "reserve").compensation
        assert compensation is not None
        if status is storno.RunStatus.COMPENSATED:
            assert info.status is status
            assert (compensation.status, compensation.attempts, rule.fired) == ("completed", 3, 2)
            assert calls.count(("release", compensation.idempotency_key)) == 1
        else:
            assert info.status is storno.RunStatus.COMPENSATION_FAILED  # a dead letter
            assert (compensation.status, compensation.attempts, rule.fired) == ("failed", 5, 5)
            assert not any(name == "release" for name, _ in calls)


async def test_crash_in_compensation_after_its_call_repeats_it_under_its_key(
    sqlite_url: str,
) -> None:
    calls: list[tuple[str, str]] = []
    buy, steps = shop(calls)
    async with storno.Storno(sqlite_url, sagas=[buy], steps=steps) as app:
        with FaultInjector() as faults:
            faults.fail_terminally("charge")
            faults.crash_compensation("reserve", when="after_call")
            worker = app.worker(worker_id="w1")
            await worker.start()
            handle = await app.start(buy, "lamp")
            crash = await faults.wait_for_crash()
            assert (crash.point, crash.attempt) == ("compensation.returned", 1)
            assert await handle.status() is storno.RunStatus.COMPENSATING
            await restart_worker(worker)
            with pytest.raises(storno.RunCompensatedError):
                await handle.result(timeout=10)
        info = await handle.describe()
    releases = [key for name, key in calls if name == "release"]
    assert len(releases) == 2 and releases[0] == releases[1]
    compensation = step_info(info, "reserve").compensation
    assert compensation is not None and compensation.attempts == 2


async def test_rules_take_turns_and_can_target_one_call_or_run(sqlite_url: str) -> None:
    seen: list[tuple[str, int]] = []

    @storno.step(kind="retryable", retry=FAST)
    def price(ctx: storno.StepContext, sku: str) -> int:
        seen.append((sku, ctx.attempt))
        return len(sku)

    @storno.saga
    async def quote(ctx: storno.SagaContext, skus: list[str]) -> int:
        return sum([await ctx.step(price, sku) for sku in skus])

    async with storno.Storno(sqlite_url, sagas=[quote]) as app, app.worker():
        with FaultInjector() as faults:
            faults.fail(price, times=1, call=2)  # only the second call of price
            faults.time_out(price, times=1, call=2)  # then, on that call, a timeout
            other = faults.fail(price, run_id="another-run")
            handle = await app.start(quote.options(run_id="q-1"), ["ab", "cde", "f"])
            assert await handle.result(timeout=10) == 6
            with pytest.raises(AssertionError, match="never fired: transient failure"):
                faults.assert_fired()
        info = await handle.describe()
    assert other.fired == 0
    assert seen == [("ab", 1), ("cde", 3), ("f", 1)]
    errors = [e.data["error"]["type"] for e in info.history if e.type == "attempt_failed"]
    assert errors == ["ConnectionError", "TimeoutError"]


async def test_crash_at_any_point_and_hooks_chain(sqlite_url: str) -> None:
    @storno.step(kind="pivot")
    def one(ctx: storno.StepContext) -> int:
        return 1

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(one)

    outer: list[str] = []
    previous = _faults.set_hook(lambda point, details: outer.append(point))
    try:
        async with storno.Storno(sqlite_url, sagas=[s], clock=VirtualClock()) as app:
            with FaultInjector() as faults:
                faults.crash_at("run.ending", status="completed")
                async with app.worker(worker_id="w1") as worker:
                    handle = await app.start(s)
                    await faults.wait_for_crash()
                    await restart_worker(worker)
                    assert await handle.result(timeout=10) == 1
            assert _faults._hook is not faults._hook  # removed again
    finally:
        _faults.set_hook(previous)
    # The hook installed before the injector saw every point the injector let through. The
    # step ran twice: its result is made durable with the run's end, which the crash stopped.
    assert outer == ["step.started", "step.returned", "step.started", "step.returned", "run.ending"]


async def test_a_crash_leaves_no_noise_about_unretrieved_task_errors(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    @storno.step(kind="pivot")
    def one(ctx: storno.StepContext) -> int:
        return 1

    @storno.saga
    def sync_body(ctx: storno.SyncSagaContext) -> int:
        return ctx.step(one)

    async with storno.Storno(sqlite_url, sagas=[sync_body], clock=VirtualClock()) as app:
        with FaultInjector() as faults:
            faults.crash(one, when="after_call")
            async with app.worker(worker_id="w1") as worker:
                handle = await app.start(sync_body)
                await faults.wait_for_crash()
                await restart_worker(worker)
                assert await handle.result(timeout=10) == 1
    import gc

    gc.collect()
    assert "never retrieved" not in caplog.text


# --- the failure-point checker -------------------------------------------------------------


class Provider:
    """A fake external API that stores calls by idempotency key, as a real one would.

    ``effects()`` counts what is in place: +1 per effect done, -1 per undo.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.done: dict[str, tuple[str, ...]] = {}
        self.undone: list[tuple[str, ...]] = []
        self.undo_keys: set[str] = set()

    def do(self, key: str, *effect: str, dedupe: bool = True) -> str:
        if not dedupe:
            key = f"{key}/{len(self.done)}"
        self.done.setdefault(key, effect)
        return key

    def undo(self, key: str, forward_key: str, dedupe: bool = True) -> None:
        if dedupe and key in self.undo_keys:
            return
        self.undo_keys.add(key)
        effect = self.done.get(forward_key)
        if effect is not None:  # nothing to undo if the call never landed
            self.undone.append(effect)

    def effects(self) -> Counter[tuple[str, ...]]:
        counts = Counter(self.done.values())
        counts.subtract(self.undone)
        return counts


def travel(
    world: Provider,
    *,
    undo_unknown: bool = True,
    idempotent_undo: bool = True,
    idempotent_do: bool = True,
    verify: bool = False,
) -> tuple[storno.Saga[..., str], list[storno.Step[..., Any]]]:
    """book_room, charge_card (compensable) -> confirm (pivot) -> notify (retryable)."""

    def compensation(name: str) -> Any:
        def undo(ctx: storno.CompensationContext[str], who: str) -> None:
            if not ctx.outcome_known and not undo_unknown:
                return  # the bug: "no result, so nothing happened"
            world.undo(ctx.idempotency_key, ctx.forward_key, dedupe=idempotent_undo)

        undo.__name__ = f"undo_{name}"
        return undo

    def find(ctx: storno.StepContext, who: str) -> object:
        return ctx.idempotency_key if ctx.idempotency_key in world.done else storno.NOT_APPLIED

    def forward(name: str, kind: str) -> storno.Step[..., str]:
        def call(ctx: storno.StepContext, who: str) -> str:
            return world.do(ctx.idempotency_key, name, who, dedupe=idempotent_do)

        call.__name__ = name
        return storno.step(
            kind=kind,
            compensate=compensation(name) if kind == "compensable" else None,
            verify=find if verify else None,
        )(call)

    steps = [
        forward("book_room", "compensable"),
        forward("charge_card", "compensable"),
        forward("confirm", "pivot"),
        forward("notify", "retryable"),
    ]

    @storno.saga(name="travel")
    async def trip(ctx: storno.SagaContext, who: str) -> str:
        for step in steps:
            await ctx.step(step, who)
        return f"booked for {who}"

    return trip, steps


async def test_checker_passes_a_well_written_saga(tmp_path: Path) -> None:
    world = Provider()
    trip, steps = travel(world)
    report = await check_failure_points(
        trip, ["ada"], effects=world.effects, steps=steps, folder=tmp_path
    )
    assert report.ok, report.summary()
    assert report.steps == ("book_room", "charge_card", "confirm", "notify")
    assert report.baseline == {
        ("book_room", "ada"): 1,
        ("charge_card", "ada"): 1,
        ("confirm", "ada"): 1,
        ("notify", "ada"): 1,
    }
    outcomes = {s.name: s.status for s in report.scenarios}
    compensated, completed = storno.RunStatus.COMPENSATED, storno.RunStatus.COMPLETED
    assert outcomes == {
        "book_room fails before its call": compensated,
        "book_room lands, then the worker dies before recording it": completed,
        "book_room lands, its answer is lost for good": compensated,
        "compensation of book_room lands, then the worker dies before recording it": compensated,
        "charge_card fails before its call": compensated,
        "charge_card lands, then the worker dies before recording it": completed,
        "charge_card lands, its answer is lost for good": compensated,
        "compensation of charge_card lands, then the worker dies before recording it": (
            compensated
        ),
        "confirm fails before its call": compensated,
        "confirm lands, then the worker dies before recording it": completed,
        "notify fails once before its call": completed,
        "notify lands, then the worker dies before recording it": completed,
    }
    files = await asyncio.to_thread(lambda: list(tmp_path.glob("*.db")))
    assert len(files) == 13  # the clean run, and one file per scenario
    assert "12 scenarios, 0 failed" in str(report)


async def test_checker_passes_a_saga_whose_steps_read_back(tmp_path: Path) -> None:
    world = Provider()
    trip, steps = travel(world, verify=True)
    report = await check_failure_points(
        trip, ["ada"], effects=world.effects, steps=steps, folder=tmp_path
    )
    assert report.ok, report.summary()
    lost = next(s for s in report.scenarios if s.name.startswith("book_room lands, its answer"))
    assert lost.info is not None and step_info(lost.info, "book_room").verified == [True]


async def test_checker_catches_a_compensation_that_ignores_unknown_outcomes() -> None:
    world = Provider()
    trip, steps = travel(world, undo_unknown=False)
    with pytest.raises(FailurePointError) as caught:
        await check_failure_points(trip, ["ada"], effects=world.effects, steps=steps)
    message = str(caught.value)
    assert "FAIL book_room lands, its answer is lost for good -> compensated" in message
    assert "left in place after compensation: ('book_room', 'ada') x1" in message
    assert "FAIL charge_card lands, its answer is lost for good" in message
    failed = {s.name for s in caught.value.report.failures}
    assert failed == {
        "book_room lands, its answer is lost for good",
        "charge_card lands, its answer is lost for good",
    }


async def test_checker_catches_a_compensation_that_is_not_idempotent() -> None:
    world = Provider()
    trip, steps = travel(world, idempotent_undo=False)
    report = await check_failure_points(
        trip, ["ada"], effects=world.effects, steps=steps, raise_on_failure=False
    )
    assert not report.ok
    failed = {s.name: s.problems for s in report.failures}
    assert set(failed) == {
        "compensation of book_room lands, then the worker dies before recording it",
        "compensation of charge_card lands, then the worker dies before recording it",
    }
    assert failed["compensation of book_room lands, then the worker dies before recording it"] == (
        "undone once more than done: ('book_room', 'ada') (-1)",
    )
    with pytest.raises(FailurePointError, match="undone once more than done"):
        report.raise_for_failures()


async def test_checker_catches_a_step_that_ignores_its_idempotency_key() -> None:
    world = Provider()
    trip, steps = travel(world, idempotent_do=False)
    with pytest.raises(FailurePointError) as caught:
        await check_failure_points(trip, ["ada"], effects=world.effects, steps=steps)
    failed = {s.name: s.problems for s in caught.value.report.failures}
    assert failed["notify lands, then the worker dies before recording it"] == (
        "in place twice, the clean run left it once: ('notify', 'ada')",
    )
    assert "confirm lands, then the worker dies before recording it" in failed


async def test_checker_reaches_the_compensation_of_a_last_step_through_a_lost_answer() -> None:
    world = Provider()

    def undo(ctx: storno.CompensationContext[str], who: str) -> None:
        world.undo(ctx.idempotency_key, ctx.forward_key)

    def find(ctx: storno.StepContext, who: str) -> object:
        return ctx.idempotency_key if ctx.idempotency_key in world.done else storno.NOT_APPLIED

    @storno.step(compensate=undo)
    def hold(ctx: storno.StepContext, who: str) -> str:
        return world.do(ctx.idempotency_key, "hold", who)

    @storno.step(compensate=undo)
    def book(ctx: storno.StepContext, who: str) -> str:
        return world.do(ctx.idempotency_key, "book", who)

    @storno.step(compensate=undo, verify=find)
    def checked_book(ctx: storno.StepContext, who: str) -> str:
        return world.do(ctx.idempotency_key, "book", who)

    for last in (book, checked_book):

        @storno.saga(name=f"all-compensable-{last.name}")
        async def s(ctx: storno.SagaContext, who: str, last: Any = last) -> None:
            await ctx.step(hold, who)
            await ctx.step(last, who)

        report = await check_failure_points(
            s, ["ada"], effects=world.effects, steps=[hold, last], reset=world.reset
        )
        title = f"compensation of {last.name} lands, then the worker dies before recording it"
        scenario = next(o for o in report.scenarios if o.name == title)
        if last is book:  # no read-back: its compensation runs with an unknown result
            assert (scenario.status, scenario.notes) == (storno.RunStatus.COMPENSATED, ())
        else:  # the read-back finds the call and the run completes: nothing to compensate
            assert scenario.status is storno.RunStatus.COMPLETED
            assert scenario.notes[0].startswith("not reached")


async def test_checker_needs_a_clean_run_that_completes() -> None:
    @storno.step(kind="pivot")
    def refuse(ctx: storno.StepContext) -> None:
        raise storno.TerminalError("never works")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(refuse)

    with pytest.raises(AssertionError, match="clean run of saga 's' must complete"):
        await check_failure_points(s, effects=list)


# --- the pytest plugin ---------------------------------------------------------------------


async def test_plugin_fixtures_work_together(
    storno_app: storno.Storno, storno_clock: VirtualClock, storno_faults: FaultInjector
) -> None:
    assert storno_app.clock is storno_clock
    assert _faults._hook is not None  # storno_faults is installed
    calls: list[int] = []

    @storno.step(kind="retryable")  # default backoff: 1 s, 2 s, 4 s ... of virtual time
    def sync_calendar(ctx: storno.StepContext) -> int:
        calls.append(ctx.attempt)
        return ctx.attempt

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(sync_calendar)

    storno_faults.fail(sync_calendar, times=3)
    started = storno_clock.now()
    assert await storno_app.run(s) == 4
    assert storno_clock.now() - started >= 1 + 2 + 4 - 2  # backoff with jitter, skipped
    assert calls == [4]


# --- docs/testing.md -----------------------------------------------------------------------

DOC = ROOT / "docs" / "testing.md"
BLOCKS = [
    pytest.param(code, id=f"testing.md:{n}")
    for n, code in enumerate(re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S), 1)
]


@pytest.mark.parametrize("code", BLOCKS)
def test_docs_testing_examples_run(code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_time_out_after_the_call_landed_is_found_by_read_back(sqlite_url: str) -> None:
    calls: list[tuple[str, str]] = []
    buy, steps = shop(calls, verify=True)
    async with storno.Storno(sqlite_url, sagas=[buy], steps=steps) as app, app.worker():
        with FaultInjector() as faults:
            faults.time_out("reserve", landed=True)
            handle = await app.start(buy, "lamp")
            assert await handle.result(timeout=10) == ["r-lamp", "c-lamp"]
        info = await handle.describe()
    reserve = step_info(info, "reserve")
    assert (reserve.attempts, reserve.verified) == (1, [True])  # found: not called again
    assert [name for name, _ in calls] == ["reserve", "charge"]
