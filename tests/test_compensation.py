"""Compensation: reverse order, keys, read-back of unknown outcomes, dead letters, the pivot."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

import storno
from storno._model import compensation_key, forward_key

FAST = storno.RetryPolicy(initial_interval=0.001, maximum_interval=0.01, maximum_attempts=5)


def booking_steps(journal: list[tuple[str, ...]], fail_at: str | None = None):
    """Four compensable steps that note every effect and counter-effect in ``journal``."""

    def make(name: str, result: str) -> storno.Step[..., str]:
        def forward(ctx: storno.StepContext, ref: str) -> str:
            if name == fail_at:
                raise storno.TerminalError(f"{name} refused")
            journal.append(("do", name, ctx.idempotency_key, ref))
            return f"{result}-{ref}"

        def undo(ctx: storno.CompensationContext[str], ref: str) -> None:
            journal.append(("undo", name, ctx.idempotency_key, ctx.forward_key, str(ctx.result)))

        forward.__name__ = name
        return storno.step(compensate=undo, retry=FAST)(forward)

    return [
        make("book_slot", "slot"),
        make("charge_card", "charge"),
        make("send_sms", "sms"),
        make("sync_calendar", "cal"),
    ]


async def test_compensations_run_in_reverse_with_args_results_and_their_own_keys(db_url: str):
    journal: list[tuple[str, ...]] = []
    steps = booking_steps(journal, fail_at="sync_calendar")

    @storno.saga
    async def booking(ctx: storno.SagaContext, ref: str) -> None:
        for step in steps:
            await ctx.step(step, ref)

    async with storno.Storno(db_url, sagas=[booking]) as app, app.worker():
        handle = await app.start(booking.options(run_id="b-1"), "A7")
        with pytest.raises(storno.RunCompensatedError, match="sync_calendar refused"):
            await handle.result(timeout=10)
        info = await handle.describe()

    assert [(e[0], e[1]) for e in journal] == [
        ("do", "book_slot"),
        ("do", "charge_card"),
        ("do", "send_sms"),
        ("undo", "send_sms"),
        ("undo", "charge_card"),
        ("undo", "book_slot"),
    ]
    undo_sms = journal[3]
    assert undo_sms[2] == compensation_key("b-1", 2, "send_sms")
    assert undo_sms[3] == forward_key("b-1", 2, "send_sms") == journal[2][2]
    assert undo_sms[4] == "sms-A7"  # the forward step's recorded result
    assert info.status is storno.RunStatus.COMPENSATED
    statuses = {s.name: (s.status, s.compensation and s.compensation.status) for s in info.steps}
    assert statuses == {
        "book_slot": ("completed", "completed"),
        "charge_card": ("completed", "completed"),
        "send_sms": ("completed", "completed"),
        "sync_calendar": ("failed", None),
    }
    # Both the bookings and the counter-bookings stay in the history.
    types = [e.type for e in info.history]
    assert types.count("step_completed") == 3
    assert types.count("compensation_step_completed") == 3
    assert types[-1] == "run_compensated"


async def test_failed_first_step_compensates_nothing(db_url: str):
    journal: list[tuple[str, ...]] = []
    steps = booking_steps(journal, fail_at="book_slot")

    @storno.saga
    async def booking(ctx: storno.SagaContext) -> None:
        for step in steps:
            await ctx.step(step, "x")

    async with storno.Storno(db_url, sagas=[booking]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError):
            await app.run(booking)
    assert journal == []


async def test_exception_in_the_saga_body_compensates_completed_steps(db_url: str):
    journal: list[tuple[str, ...]] = []
    steps = booking_steps(journal)

    @storno.saga
    async def booking(ctx: storno.SagaContext) -> None:
        await ctx.step(steps[0], "x")
        await ctx.step(steps[1], "x")
        raise ValueError("the agent changed its mind")

    async with storno.Storno(db_url, sagas=[booking]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="changed its mind"):
            await app.run(booking)
    assert [e[:2] for e in journal if e[0] == "undo"] == [
        ("undo", "charge_card"),
        ("undo", "book_slot"),
    ]


async def test_saga_body_may_catch_a_failed_step_and_take_another_path(db_url: str):
    @storno.step(kind="pivot")
    def primary(ctx: storno.StepContext) -> str:
        raise storno.TerminalError("primary provider refused")

    @storno.step(kind="pivot")
    def fallback(ctx: storno.StepContext) -> str:
        return "fallback"

    @storno.saga
    async def s(ctx: storno.SagaContext) -> str:
        try:
            return await ctx.step(primary)
        except storno.StepFailedError as exc:
            return f"{await ctx.step(fallback)} after {exc.step}"

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        assert await app.run(s) == "fallback after primary"


async def test_unknown_outcome_is_read_back_before_compensating(db_url: str):
    provider: set[str] = set()
    undone: list[object] = []

    def landed(ctx: storno.StepContext, which: str) -> object:
        return "found" if ctx.idempotency_key in provider else storno.NOT_APPLIED

    def undo(ctx: storno.CompensationContext[str], which: str) -> None:
        undone.append((which, ctx.result))

    lost_answer = storno.RetryPolicy(initial_interval=0.001, maximum_attempts=1)

    @storno.step(verify=landed, compensate=undo, retry=lost_answer)
    def write(ctx: storno.StepContext, which: str) -> str:
        if which == "landed":
            provider.add(ctx.idempotency_key)
        raise OSError("connection reset")  # a definite failure as far as storno knows

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        with contextlib.suppress(storno.StepFailedError):
            await ctx.step(write, "landed")
        await ctx.step(write, "not-landed")

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError):
            await app.run(s)
    # Both attempts failed definitively, so neither is compensated.
    assert undone == []


async def test_timed_out_step_is_compensated_only_if_read_back_finds_it(db_url: str):
    provider: dict[str, str] = {}
    undone: list[tuple[str, object]] = []

    def landed(ctx: storno.StepContext, which: str) -> object:
        return provider.get(ctx.idempotency_key, storno.NOT_APPLIED)

    def undo(ctx: storno.CompensationContext[str], which: str) -> None:
        undone.append((which, ctx.result))

    once = storno.RetryPolicy(initial_interval=0.001, maximum_attempts=1)

    def make(name: str, lands: bool) -> storno.Step[..., str]:
        def call(ctx: storno.StepContext, which: str) -> str:
            if lands:
                provider[ctx.idempotency_key] = f"{which}-result"
            raise storno.OutcomeUnknownError("gateway timeout")

        call.__name__ = name
        return storno.step(compensate=undo, retry=once)(call)

    lands, vanishes = make("lands", True), make("vanishes", False)
    lands.verifier(landed)
    vanishes.verifier(landed)

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        with contextlib.suppress(storno.StepFailedError):
            await ctx.step(lands, "a")
        await ctx.step(vanishes, "b")

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        handle = await app.start(s)
        # The read-back right after the lost answer finds "a": it completes with that result.
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=10)
        info = await handle.describe()
    assert undone == [("a", "a-result")]
    assert [s.compensation and s.compensation.status for s in info.steps] == [
        "completed",
        None,
    ]


async def test_unknown_outcome_without_read_back_is_compensated_blind(db_url: str):
    seen: list[tuple[object, bool]] = []

    def undo(ctx: storno.CompensationContext[str]) -> None:
        seen.append((ctx.result, ctx.outcome_known))

    @storno.step(compensate=undo, retry=storno.RetryPolicy(maximum_attempts=1))
    def maybe(ctx: storno.StepContext) -> str:
        raise storno.OutcomeUnknownError("no answer")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(maybe)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError):
            await app.run(s)
    assert seen == [(storno.UNKNOWN, False)]


async def test_compensation_is_retried_with_the_same_key(db_url: str):
    keys: list[str] = []

    def flaky_undo(ctx: storno.CompensationContext[None]) -> None:
        keys.append(ctx.idempotency_key)
        if ctx.attempt < 3:
            raise ConnectionError("refund API down")

    @storno.step(compensate=flaky_undo, compensation_retry=FAST)
    def charge(ctx: storno.StepContext) -> None:
        pass

    @storno.step(kind="pivot")
    def fails(ctx: storno.StepContext) -> None:
        raise storno.TerminalError("no")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(charge)
        await ctx.step(fails)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError):
            await app.run(s)
    assert len(keys) == 3 and len(set(keys)) == 1


async def test_compensation_that_keeps_failing_makes_a_dead_letter(db_url: str):
    undone: list[str] = []

    def broken_undo(ctx: storno.CompensationContext[None]) -> None:
        raise ConnectionError("refund API gone")

    def good_undo(ctx: storno.CompensationContext[None]) -> None:
        undone.append(ctx.step)

    @storno.step(compensate=good_undo)
    def book(ctx: storno.StepContext) -> None:
        pass

    @storno.step(compensate=broken_undo, compensation_retry=FAST)
    def charge(ctx: storno.StepContext) -> None:
        pass

    @storno.step(kind="pivot")
    def fails(ctx: storno.StepContext) -> None:
        raise storno.TerminalError("no")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(book)
        await ctx.step(charge)
        await ctx.step(fails)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        handle = await app.start(s)
        with pytest.raises(storno.CompensationFailedError) as caught:
            await handle.result(timeout=10)
        dead = await app.list_runs(status="compensation_failed")
        info = await handle.describe()
    assert "compensation of step 'charge'" in str(caught.value)
    assert "refund API gone" in str(caught.value)
    assert [r.run_id for r in dead] == [handle.run_id]
    # Compensation stops at the failing step: reverse order is kept for when it is retried.
    assert undone == []
    charge_info = next(s for s in info.steps if s.name == "charge")
    assert charge_info.compensation is not None
    assert (charge_info.compensation.status, charge_info.compensation.attempts) == ("failed", 5)


async def test_failure_after_the_pivot_parks_the_run_without_compensating(db_url: str):
    undone: list[str] = []

    @storno.step(compensate=lambda ctx: undone.append(ctx.step))
    def reserve(ctx: storno.StepContext) -> None:
        pass

    @storno.step(kind="pivot")
    def charge(ctx: storno.StepContext) -> None:
        pass

    @storno.step(kind="noncompensable", retry=FAST)
    def notify(ctx: storno.StepContext) -> None:
        raise storno.TerminalError("SMS gateway rejected the number")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(reserve)
        await ctx.step(charge)
        await ctx.step(notify)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.NeedsAttentionError, match="point of no return .*'charge'"):
            await app.run(s)
    assert undone == []


async def test_retryable_steps_after_the_pivot_are_retried_until_they_succeed(db_url: str):
    @storno.step(kind="pivot")
    def charge(ctx: storno.StepContext) -> None:
        pass

    @storno.step(kind="retryable")
    def sync(ctx: storno.StepContext) -> int:
        if ctx.attempt < 8:
            raise ConnectionError("calendar API flaky")
        return ctx.attempt

    assert sync.retry.maximum_attempts is None  # the default for retryable steps

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        await ctx.step(charge)
        no_wait = storno.RetryPolicy(initial_interval=0.001, maximum_attempts=None)
        return await ctx.step(sync.options(retry=no_wait))

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        assert await app.run(s) == 8


async def test_compensable_step_after_the_pivot_is_refused_at_run_time(db_url: str):
    ran: list[str] = []

    @storno.step(kind="pivot")
    def charge(ctx: storno.StepContext) -> None:
        ran.append("charge")

    @storno.step(compensate=lambda ctx: None)
    def late(ctx: storno.StepContext) -> None:
        ran.append("late")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(charge)
        await ctx.step(late)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.NeedsAttentionError, match="'late' .* is compensable but"):
            await app.run(s)
    assert ran == ["charge"]


async def test_compensable_step_without_compensation_is_refused(db_url: str):
    @storno.step
    def orphan(ctx: storno.StepContext) -> None:
        raise AssertionError("must not run")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(orphan)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="compensable but has no compensation"):
            await app.run(s)


@pytest.mark.sqlite_only
async def test_history_cannot_be_changed_or_deleted(db_url: str, tmp_path: Path):
    @storno.step(kind="retryable")
    def one(ctx: storno.StepContext) -> int:
        return 1

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(one)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        await app.run(s)
    conn = sqlite3.connect(tmp_path / "storno.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE storno_events SET type = 'x'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM storno_events")
    conn.close()
