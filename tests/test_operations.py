"""Operating on runs: cancel, dead letters retried and resolved, every action journaled."""

from __future__ import annotations

import pytest

import storno
from conftest import wait_for

LEDGER: list[str] = []
FLAKY = {"refund_failures": 0}


@pytest.fixture(autouse=True)
def _clear() -> None:
    LEDGER.clear()
    FLAKY["refund_failures"] = 0


@storno.step(kind="compensable")
def hold(ctx: storno.StepContext, what: str) -> str:
    LEDGER.append(f"hold {what}")
    return what


@hold.compensation
def unhold(ctx: storno.CompensationContext[str], what: str) -> None:
    if FLAKY["refund_failures"] > 0:
        FLAKY["refund_failures"] -= 1
        raise storno.TerminalError("refund API down")
    LEDGER.append(f"unhold {what} {ctx.idempotency_key}")


@storno.step(kind="pivot")
def commit(ctx: storno.StepContext) -> str:
    LEDGER.append("commit")
    return "done"


@storno.saga
async def reservation(ctx: storno.SagaContext) -> str:
    await ctx.step(hold, "room")
    await ctx.wait_for_signal("confirm")
    return await ctx.step(commit)


@storno.saga
async def committed(ctx: storno.SagaContext) -> str:
    await ctx.step(hold, "seat")
    await ctx.step(commit)
    await ctx.wait_for_signal("never")
    return "x"


async def _is(app: storno.Storno, run_id: str, status: storno.RunStatus) -> bool:
    return await app.get_handle(run_id).status() is status


async def test_cancel_a_waiting_run_compensates_it(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[reservation]) as app, app.worker():
        handle = await app.start(reservation)
        await wait_for(lambda: _is(app, handle.run_id, storno.RunStatus.WAITING))
        await app.cancel(handle.run_id, by="ops@example.com", reason="customer called")
        with pytest.raises(storno.RunCancelledError, match="cancelled"):
            await handle.result(timeout=5)
        info = await app.describe(handle.run_id)
    assert info.status is storno.RunStatus.CANCELLED
    assert LEDGER[0] == "hold room" and LEDGER[1].startswith("unhold room stc-")
    asked = next(e for e in info.history if e.type == "cancel_requested")
    assert asked.data["by"] == "ops@example.com" and asked.data["reason"] == "customer called"
    assert info.history[-1].type == "run_cancelled"


async def test_cancel_a_pending_run_before_any_worker_took_it(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[reservation]) as app:
        handle = await app.start(reservation)
        await app.cancel(handle.run_id, by="ops", reason="not needed")
        async with app.worker():
            with pytest.raises(storno.RunCancelledError):
                await handle.result(timeout=5)
    assert LEDGER == []


async def test_cancel_after_the_pivot_is_refused(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[committed]) as app, app.worker():
        handle = await app.start(committed)
        await wait_for(lambda: _is(app, handle.run_id, storno.RunStatus.WAITING))
        with pytest.raises(storno.RunStateError, match="past its point of no return"):
            await app.cancel(handle.run_id, by="ops", reason="too late")
        assert await handle.status() is storno.RunStatus.WAITING
    assert "unhold seat" not in " ".join(LEDGER)


async def test_cancel_of_unknown_or_ended_run(db_url: str) -> None:
    @storno.saga
    async def quick(ctx: storno.SagaContext) -> int:
        return 1

    async with storno.Storno(db_url, sagas=[quick]) as app, app.worker():
        with pytest.raises(storno.RunNotFoundError):
            await app.cancel("nope", by="ops", reason="x")
        handle = await app.start(quick)
        await handle.result(timeout=5)
        with pytest.raises(storno.RunStateError, match="already ended"):
            await app.cancel(handle.run_id, by="ops", reason="x")


@storno.step(kind="compensable")
def fail_now(ctx: storno.StepContext) -> None:
    raise storno.TerminalError("card declined")


fail_now.compensation(lambda ctx: None)


@storno.saga
async def doomed(ctx: storno.SagaContext) -> None:
    await ctx.step(hold.options(compensation_retry=storno.RetryPolicy(maximum_attempts=1)), "car")
    await ctx.step(fail_now)


async def test_dead_letter_retry_resumes_with_the_same_compensation_key(db_url: str) -> None:
    FLAKY["refund_failures"] = 1
    async with storno.Storno(db_url, sagas=[doomed]) as app, app.worker():
        handle = await app.start(doomed)
        with pytest.raises(storno.CompensationFailedError, match="refund API down"):
            await handle.result(timeout=5)
        assert [r.run_id for r in await app.dead_letters()] == [handle.run_id]
        failed = (await app.describe(handle.run_id)).steps[0].compensation
        assert failed is not None and failed.status == "failed"
        await app.retry(handle.run_id, by="ops", note="refund API is back")
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=5)
        info = await app.describe(handle.run_id)
        assert await app.dead_letters() == []
    expected = ["hold car", f"unhold car {failed.idempotency_key}"]
    assert expected == LEDGER
    action = next(e for e in info.history if e.type == "operator_action")
    assert action.data == {
        "action": "retry",
        "by": "ops",
        "note": "refund API is back",
        "from": "compensation_failed",
    }


async def test_dead_letter_resolved_by_hand(db_url: str) -> None:
    FLAKY["refund_failures"] = 5
    async with storno.Storno(db_url, sagas=[doomed]) as app, app.worker():
        handle = await app.start(doomed)
        with pytest.raises(storno.CompensationFailedError):
            await handle.result(timeout=5)
        with pytest.raises(storno.ConfigurationError, match="needs a note"):
            await app.resolve(handle.run_id, by="ops", note="")
        await app.resolve(handle.run_id, by="ops", note="refunded in the provider's console")
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=5)
        with pytest.raises(storno.RunStateError, match="only a run that needs a person"):
            await app.retry(handle.run_id, by="ops")
        info = await app.describe(handle.run_id)
    assert info.history[-1].type == "operator_action"
    assert info.history[-1].data["note"] == "refunded in the provider's console"


async def test_cancel_a_running_run_stops_it_at_the_next_step(db_url: str) -> None:
    import asyncio

    entered, release = asyncio.Event(), asyncio.Event()

    @storno.step(kind="compensable", compensate=lambda ctx: LEDGER.append("undo slow"))
    async def slow(ctx: storno.StepContext) -> str:
        entered.set()
        await release.wait()
        LEDGER.append("slow done")
        return "slow"

    @storno.step(kind="compensable", compensate=lambda ctx: None)
    def never(ctx: storno.StepContext) -> None:
        LEDGER.append("never")

    @storno.saga
    async def busy(ctx: storno.SagaContext) -> None:
        await ctx.step(slow)
        await ctx.step(never)

    async with storno.Storno(db_url, sagas=[busy]) as app, app.worker():
        handle = await app.start(busy)
        await asyncio.wait_for(entered.wait(), 5)
        await app.cancel(handle.run_id, by="ops", reason="stop it")
        release.set()  # the call in flight finishes; nothing after it starts
        with pytest.raises(storno.RunCancelledError):
            await handle.result(timeout=5)
    assert LEDGER == ["slow done", "undo slow"]


async def test_deadline_ends_a_wait_and_compensates(db_url: str) -> None:
    @storno.saga(timeout=0.3)
    async def impatient(ctx: storno.SagaContext) -> None:
        await ctx.step(hold, "table")
        await ctx.wait_for_signal("never comes")

    async with storno.Storno(db_url, sagas=[impatient]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="deadline"):
            await app.run(impatient)
    assert LEDGER[0] == "hold table" and LEDGER[1].startswith("unhold table")


async def test_listeners_see_every_event_made_durable_in_order(db_url: str) -> None:
    seen: list[tuple[str, int, str]] = []

    def listen(run: object, events: list[object]) -> None:
        for event in events:
            seen.append((run.run_id, event.seq, event.type.value))  # type: ignore[attr-defined]

    def broken(run: object, events: list[object]) -> None:
        raise RuntimeError("a listener bug must not touch the run")

    async with storno.Storno(db_url, sagas=[committed]) as app, app.worker():
        app.add_listener(broken)
        app.add_listener(listen)
        handle = await app.start(committed)
        await wait_for(lambda: _is(app, handle.run_id, storno.RunStatus.WAITING))
        history = (await app.describe(handle.run_id)).history
    # Every event after the run's creation (written by start(), not by a worker).
    assert [(r, s, t) for r, s, t in seen] == [
        (handle.run_id, e.seq, e.type) for e in history if e.type != "run_created"
    ]


async def test_list_runs_pages_on_and_counts_with_several_statuses(
    app: storno.Storno,
) -> None:
    # No worker runs here: every run stays pending.
    saga = reservation.options
    ids = [(await app.start(saga(run_id=f"r{i:03d}"))).run_id for i in range(7)]
    assert await app.count_runs() == 7
    assert await app.count_runs(status="pending") == 7
    assert await app.count_runs(status=["pending", "completed"], saga="reservation") == 7
    assert await app.count_runs(status=[]) == 0
    assert await app.count_runs(status="completed") == 0
    assert await app.count_runs(saga="other") == 0
    first = await app.list_runs(limit=3)
    second = await app.list_runs(limit=3, offset=3)
    rest = await app.list_runs(offset=6)
    listed = [r.run_id for r in first + second + rest]
    assert sorted(listed) == ids and len(set(listed)) == 7
    assert len(await app.list_runs(status=[storno.RunStatus.PENDING, "completed"])) == 7
    assert await app.list_runs(status=["completed", "compensated"]) == []
    with pytest.raises(ValueError, match="bogus"):
        await app.list_runs(status=["pending", "bogus"])
