"""Composite sagas: fan-out/fan-in inside a run, and child runs."""

from __future__ import annotations

import asyncio

import pytest

import storno
from conftest import wait_for

LEDGER: list[str] = []
GATE: dict[str, asyncio.Event] = {}


@pytest.fixture(autouse=True)
def _clear() -> None:
    LEDGER.clear()
    GATE.clear()


@storno.step(kind="compensable")
async def book(ctx: storno.StepContext, what: str, delay: float = 0.0) -> str:
    await asyncio.sleep(delay)
    if what.startswith("bad"):
        raise storno.TerminalError(f"{what} refused")
    LEDGER.append(f"book {what}")
    return what


@book.compensation
def unbook(ctx: storno.CompensationContext[str], what: str, delay: float = 0.0) -> None:
    LEDGER.append(f"unbook {what}")


@storno.step(kind="pivot")
def pay(ctx: storno.StepContext) -> str:
    LEDGER.append("pay")
    return "paid"


@storno.saga
async def trip(ctx: storno.SagaContext, hotel: str) -> list[str]:
    first = await ctx.step(book, "flight")
    rest = await ctx.gather(
        ctx.step(book, "car", 0.03), ctx.step(book, hotel, 0.01), ctx.step(book, "museum", 0.0)
    )
    return [first, *rest]


async def test_gather_runs_steps_concurrently_and_returns_in_argument_order(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[trip]) as app, app.worker():
        handle = await app.start(trip, "hotel")
        assert await handle.result(timeout=5) == ["flight", "car", "hotel", "museum"]
        info = await app.describe(handle.run_id)
    assert [s.position for s in info.steps] == [0, 1, 2, 3]
    # Completion order follows the delays, not the argument order.
    assert LEDGER == ["book flight", "book museum", "book hotel", "book car"]


async def test_gather_failure_compensates_the_others_in_reverse_completion_order(
    db_url: str,
) -> None:
    async with storno.Storno(db_url, sagas=[trip]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="bad hotel refused"):
            await app.run(trip, "bad hotel")
    assert LEDGER == [
        "book flight",
        "book museum",
        "book car",  # the slow branch was awaited, not abandoned
        "unbook car",
        "unbook museum",
        "unbook flight",
    ]


async def test_pivot_cannot_run_alongside_other_steps(db_url: str) -> None:
    @storno.saga
    async def rushed(ctx: storno.SagaContext) -> None:
        await ctx.gather(ctx.step(book, "room", 0.01), ctx.step(pay))

    async with storno.Storno(db_url, sagas=[rushed]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="would run alongside 'book'"):
            await app.run(rushed)
    assert "pay" not in LEDGER and LEDGER == ["book room", "unbook room"]


@storno.saga
async def child_booking(ctx: storno.SagaContext, what: str) -> str:
    return await ctx.step(book, what)


@storno.saga
async def parent(ctx: storno.SagaContext, fail: bool) -> str:
    first = await ctx.child(child_booking, "hotel")
    await ctx.step(book, "bad" if fail else "dinner")
    return first


async def test_child_result_reaches_the_parent_and_they_are_linked(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[parent, child_booking]) as app, app.worker():
        handle = await app.start(parent, False)
        assert await handle.result(timeout=5) == "hotel"
        info = await app.describe(handle.run_id)
        child_id = info.steps[0].child_run_id
        assert child_id == f"{handle.run_id}/0"
        child = await app.describe(child_id)
    assert child.parent_run_id == handle.run_id and child.status is storno.RunStatus.COMPLETED
    assert LEDGER == ["book hotel", "book dinner"]


async def test_compensating_the_parent_compensates_its_completed_child(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[parent, child_booking]) as app, app.worker():
        handle = await app.start(parent, True)
        with pytest.raises(storno.RunCompensatedError, match="bad refused"):
            await handle.result(timeout=5)
        child = await app.describe(f"{handle.run_id}/0")
    assert child.status is storno.RunStatus.COMPENSATED
    assert LEDGER == ["book hotel", "unbook hotel"]


async def test_child_failure_is_raised_in_the_parent(db_url: str) -> None:
    @storno.saga
    async def careful_parent(ctx: storno.SagaContext) -> str:
        await ctx.step(book, "flight")
        try:
            await ctx.child(child_booking, "bad room")
        except storno.ChildFailedError as exc:
            return f"child {exc.status}"
        return "unexpected"

    async with storno.Storno(db_url, sagas=[careful_parent, child_booking]) as app, app.worker():
        assert await app.run(careful_parent) == "child compensated"
    assert LEDGER == ["book flight"]


async def test_child_waiting_for_a_signal_keeps_the_parent_waiting(db_url: str) -> None:
    @storno.saga
    async def approval_child(ctx: storno.SagaContext) -> str:
        return str(await ctx.wait_for_signal("ok"))

    @storno.saga
    async def waiting_parent(ctx: storno.SagaContext) -> str:
        return await ctx.child(approval_child)

    sagas = [waiting_parent, approval_child]
    async with storno.Storno(db_url, sagas=sagas) as app, app.worker():
        handle = await app.start(waiting_parent)
        child_id = f"{handle.run_id}/0"

        async def both_waiting() -> bool:
            records = [await app.store.get_run(i) for i in (handle.run_id, child_id)]
            return all(r is not None and r.status == "waiting" for r in records)

        await wait_for(both_waiting)
        await app.signal(child_id, "ok", "yes")
        assert await handle.result(timeout=5) == "yes"
