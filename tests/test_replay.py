"""Resuming from history: replay, unknown outcomes after a crash, recorded values,
non-determinism, argument mismatches, lease takeover and fencing.

A crash is simulated in-process by raising a BaseException at an engine fault point (the
worker's task dies with its lease still held); the subprocess SIGKILL tests are in
test_crash.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

import storno
from conftest import crash_at, wait_for
from storno._model import EventType, Lease
from storno._store import RunUpdate

FAST = storno.RetryPolicy(initial_interval=0.001, maximum_interval=0.01, maximum_attempts=5)


async def crash_and_resume(
    db_url: str,
    sagas: list[storno.Saga[..., Any]],
    start: storno.Saga[..., Any],
    args: tuple[Any, ...],
    point: str,
    resume_with: list[storno.Saga[..., Any]] | None = None,
    steps: tuple[storno.Step[..., Any], ...] = (),
    **match: Any,
) -> tuple[storno.RunInfo, BaseException | Any]:
    """Run until the fault point 'kills' the worker, then resume with a fresh worker that
    has the same id (as a restarted process would); return the run and its outcome."""
    async with storno.Storno(db_url, sagas=sagas, steps=steps) as app:
        with crash_at(point, **match) as crash:
            worker = app.worker(worker_id="w1")
            async with worker:
                handle = await app.start(start, *args)
                await wait_for(lambda: asyncio.sleep(0, crash.fired))
                await wait_for(lambda: asyncio.sleep(0, not worker.active_runs))
        assert crash.fired == 1, f"fault point {point} {match} was never reached"
        assert await handle.status() in (storno.RunStatus.RUNNING, storno.RunStatus.COMPENSATING)
    resumed = storno.Storno(db_url, sagas=resume_with or sagas, steps=steps)
    async with resumed as app, app.worker(worker_id="w1"):
        handle = app.get_handle(handle.run_id)
        try:
            outcome: Any = await handle.result(timeout=10)
        except storno.RunFailedError as exc:
            outcome = exc
        return await handle.describe(), outcome


def ledger_steps(calls: list[tuple[str, str]]) -> tuple[storno.Step[..., str], ...]:
    @storno.step(compensate=lambda ctx, x: calls.append(("undo-a", ctx.idempotency_key)))
    def a(ctx: storno.StepContext, x: str) -> str:
        calls.append(("a", ctx.idempotency_key))
        return f"a:{x}"

    @storno.step(compensate=lambda ctx, x: calls.append(("undo-b", ctx.idempotency_key)))
    def b(ctx: storno.StepContext, x: str) -> str:
        calls.append(("b", ctx.idempotency_key))
        return f"b:{x}"

    @storno.step(kind="pivot", retry=FAST)
    def c(ctx: storno.StepContext, x: str) -> str:
        calls.append(("c", ctx.idempotency_key))
        if x == "fail":
            raise storno.TerminalError("c refused")
        return f"c:{x}"

    return a, b, c


async def test_crash_after_a_call_returned_retries_it_with_the_same_key(db_url: str):
    calls: list[tuple[str, str]] = []
    a, b, c = ledger_steps(calls)
    bodies: list[int] = []

    @storno.saga
    async def s(ctx: storno.SagaContext, x: str) -> list[str]:
        bodies.append(1)
        return [await ctx.step(a, x), await ctx.step(b, x), await ctx.step(c, x)]

    info, outcome = await crash_and_resume(db_url, [s], s, ("ok",), "step.returned", step="b")
    assert outcome == ["a:ok", "b:ok", "c:ok"]
    assert [name for name, _ in calls] == ["a", "b", "b", "c"]  # a is replayed, not re-run
    assert calls[1][1] == calls[2][1]  # b's outcome was unknown: retried under its key
    assert len(bodies) == 2
    types = [e.type for e in info.history]
    assert "run_resumed" in types and "outcome_unknown" in types
    assert info.steps[1].attempts == 2


async def test_crash_after_durable_start_is_read_back_before_any_call(db_url: str):
    provider: dict[str, str] = {}
    calls: list[str] = []

    def read_back(ctx: storno.StepContext) -> object:
        return provider.get(ctx.idempotency_key, storno.NOT_APPLIED)

    @storno.step(kind="pivot", verify=read_back)
    def charge(ctx: storno.StepContext) -> str:
        calls.append(ctx.idempotency_key)
        provider[ctx.idempotency_key] = "ch-1"
        return "ch-1"

    @storno.saga
    async def s(ctx: storno.SagaContext) -> str:
        return await ctx.step(charge)

    info, outcome = await crash_and_resume(db_url, [s], s, (), "step.started", step="charge")
    assert outcome == "ch-1"
    assert len(calls) == 1  # the crashed attempt never called; the read-back said so
    assert info.steps[0].verified == [False]


async def test_crash_after_the_call_landed_is_read_back_not_repeated(db_url: str):
    provider: dict[str, str] = {}
    calls: list[str] = []

    @storno.step(
        kind="pivot",
        verify=lambda ctx: provider.get(ctx.idempotency_key, storno.NOT_APPLIED),
    )
    def charge(ctx: storno.StepContext) -> str:
        calls.append(ctx.idempotency_key)
        provider[ctx.idempotency_key] = "ch-1"
        return "ch-1"

    @storno.saga
    async def s(ctx: storno.SagaContext) -> str:
        return await ctx.step(charge)

    info, outcome = await crash_and_resume(db_url, [s], s, (), "step.returned", step="charge")
    assert outcome == "ch-1"
    assert len(calls) == 1
    assert info.steps[0].verified == [True]


async def test_recorded_values_replay_identically(db_url: str):
    seen: list[Any] = []

    @storno.step(kind="retryable")
    def use(ctx: storno.StepContext, stamp: Any, token: Any, roll: float) -> None:
        seen.append((stamp, token, roll))

    @storno.step(kind="retryable")
    def later(ctx: storno.StepContext) -> None:
        pass

    @storno.saga
    async def s(ctx: storno.SagaContext) -> list[Any]:
        values = [ctx.now(), ctx.uuid4(), ctx.random()]
        await ctx.step(use, *values)
        await ctx.step(later)
        return values

    info, outcome = await crash_and_resume(db_url, [s], s, (), "step.returned", step="later")
    # Had any value changed on replay, `use` would have been refused for new arguments.
    assert info.status is storno.RunStatus.COMPLETED
    assert len(seen) == 1
    assert list(seen[0]) == outcome


async def test_changed_step_sequence_parks_the_run_and_compensates_nothing(db_url: str):
    calls: list[tuple[str, str]] = []
    a, b, _c = ledger_steps(calls)

    @storno.saga(name="flow")
    async def v1(ctx: storno.SagaContext, x: str) -> None:
        await ctx.step(a, x)
        await ctx.step(b, x)

    @storno.saga(name="flow")
    async def v2(ctx: storno.SagaContext, x: str) -> None:
        await ctx.step(b, x)  # the code changed: b now comes first
        await ctx.step(a, x)

    info, outcome = await crash_and_resume(
        db_url, [v1], v1, ("ok",), "step.returned", resume_with=[v2], step="b"
    )
    assert isinstance(outcome, storno.NeedsAttentionError)
    assert "asks for step 'b' but the history recorded step 'a'" in str(outcome)
    assert not [name for name, _ in calls if name.startswith("undo")]
    assert info.history[-1].type == EventType.RUN_NEEDS_ATTENTION.value


async def test_code_that_stops_short_of_its_history_is_detected(db_url: str):
    calls: list[tuple[str, str]] = []
    a, b, _ = ledger_steps(calls)

    @storno.saga(name="flow")
    async def v1(ctx: storno.SagaContext) -> None:
        await ctx.step(a, "x")
        await ctx.step(b, "x")

    @storno.saga(name="flow")
    async def v2(ctx: storno.SagaContext) -> None:
        pass

    _, outcome = await crash_and_resume(
        db_url, [v1], v1, (), "step.returned", resume_with=[v2], step="b"
    )
    assert isinstance(outcome, storno.NeedsAttentionError)
    assert "no longer reaches" in str(outcome)


async def test_retry_with_other_arguments_is_refused_naming_both_values(db_url: str):
    charged: list[float] = []

    @storno.step(compensate=lambda ctx, amount: None)
    def charge(ctx: storno.StepContext, amount: float) -> str:
        charged.append(amount)
        return "ch"

    @storno.saga(name="agent")
    async def v1(ctx: storno.SagaContext) -> None:
        await ctx.step(charge, 100.00)

    @storno.saga(name="agent")
    async def v2(ctx: storno.SagaContext) -> None:
        # An agent that "retries" with other numbers; swallowing the error does not help:
        # the run is parked anyway.
        with contextlib.suppress(storno.DeterminismError):
            await ctx.step(charge, 99.99)

    _, outcome = await crash_and_resume(
        db_url, [v1], v1, (), "step.returned", resume_with=[v2], step="charge"
    )
    assert isinstance(outcome, storno.NeedsAttentionError)
    message = str(outcome)
    assert "100.0" in message and "99.99" in message and "same key" in message
    assert charged == [100.00]


async def test_crash_during_compensation_resumes_it_from_history(db_url: str):
    calls: list[tuple[str, str]] = []
    a, b, c = ledger_steps(calls)
    bodies: list[int] = []

    @storno.saga
    async def s(ctx: storno.SagaContext, x: str) -> None:
        bodies.append(1)
        await ctx.step(a, x)
        await ctx.step(b, x)
        await ctx.step(c, x)

    # Compensation resumes from the history alone, without the saga body, so the steps are
    # found by name: registered here (module-level steps are also found by their import path).
    info, outcome = await crash_and_resume(
        db_url, [s], s, ("fail",), "compensation.returned", steps=(a, b, c), step="b"
    )
    assert isinstance(outcome, storno.RunCompensatedError)
    names = [name for name, _ in calls]
    assert names == ["a", "b", "c", "undo-b", "undo-b", "undo-a"]
    assert calls[3][1] == calls[4][1]  # the compensation is retried under its own key
    assert len(bodies) == 1
    assert [s.compensation and s.compensation.status for s in info.steps] == [
        "completed",
        "completed",
        None,
    ]


async def test_run_of_a_dead_worker_is_taken_over_after_its_lease_expires(db_url: str):
    calls: list[tuple[str, str]] = []
    a, b, _c = ledger_steps(calls)

    @storno.saga
    async def s(ctx: storno.SagaContext) -> list[str]:
        return [await ctx.step(a, "x"), await ctx.step(b, "x")]

    async with storno.Storno(db_url, sagas=[s], lease_seconds=0.5) as app:
        with crash_at("step.returned", step="b") as crash:
            dead = app.worker(worker_id="dead")
            async with dead:
                handle = await app.start(s)
                await wait_for(lambda: asyncio.sleep(0, crash.fired))
                await wait_for(lambda: asyncio.sleep(0, not dead.active_runs))
        record = await app.store.get_run(handle.run_id)
        assert record is not None and record.owner == "dead"
        async with app.worker(worker_id="other", poll_interval=0.05):
            assert await handle.result(timeout=10) == ["a:x", "b:x"]
        record = await app.store.get_run(handle.run_id)
        assert record is not None and record.epoch == 2


async def test_a_stale_lease_cannot_write(app: storno.Storno):
    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        pass

    handle = await app.start(s)
    claimed = await app.store.claim("w1", limit=5, now=app.clock.now(), lease_seconds=0.01)
    [(_record, first)] = claimed
    await asyncio.sleep(0.02)
    [(_, second)] = await app.store.claim("w2", limit=5, now=app.clock.now(), lease_seconds=30)
    assert second.epoch == first.epoch + 1
    with pytest.raises(storno.LeaseLostError, match="another worker took it over"):
        await app.store.write(
            first, [], RunUpdate(storno.RunStatus.COMPLETED), now=app.clock.now(), lease_seconds=30
        )
    zombie = Lease(handle.run_id, "w2", first.epoch)
    with pytest.raises(storno.LeaseLostError):
        await app.store.write(zombie, [], None, now=app.clock.now(), lease_seconds=30)
    assert await handle.status() is storno.RunStatus.RUNNING


async def test_an_emit_whose_topic_changed_under_the_run_parks_it(db_url: str):
    calls: list[tuple[str, str]] = []
    a, b, _c = ledger_steps(calls)

    @storno.saga(name="announcing")
    async def v1(ctx: storno.SagaContext) -> None:
        ctx.emit("slot.held", {"n": 1})
        await ctx.step(a, "x")
        await ctx.step(b, "x")

    @storno.saga(name="announcing")
    async def v2(ctx: storno.SagaContext) -> None:
        ctx.emit("slot.reserved", {"n": 1})  # the code changed the topic of a sent event
        await ctx.step(a, "x")
        await ctx.step(b, "x")

    info, outcome = await crash_and_resume(
        db_url, [v1], v1, (), "step.returned", resume_with=[v2], step="b"
    )
    assert isinstance(outcome, storno.NeedsAttentionError)
    assert "ctx.emit('slot.reserved')" in str(outcome)
    emitted = [e for e in info.history if e.type == EventType.EVENT_EMITTED.value]
    assert len(emitted) == 1  # the recorded event stays; nothing new was emitted
