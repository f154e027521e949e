"""Concurrency limits per saga hold across every worker sharing the database."""

from __future__ import annotations

import asyncio

import pytest

import storno
from conftest import wait_for

RUNNING = {"now": 0, "max": 0}


@pytest.fixture(autouse=True)
def _reset() -> None:
    RUNNING.update(now=0, max=0)


@storno.step(kind="retryable")
async def busy(ctx: storno.StepContext) -> None:
    RUNNING["now"] += 1
    RUNNING["max"] = max(RUNNING["max"], RUNNING["now"])
    await asyncio.sleep(0.03)
    RUNNING["now"] -= 1


@storno.saga(max_concurrent=2)
async def capped(ctx: storno.SagaContext) -> None:
    await ctx.step(busy)
    await ctx.step(busy)


@storno.saga(max_concurrent=1)
async def parked(ctx: storno.SagaContext) -> str:
    return str(await ctx.wait_for_signal("go"))


async def test_limit_holds_across_workers_of_separate_applications(db_url: str) -> None:
    # Two applications on one database stand for two processes: they share nothing in memory.
    async with (
        storno.Storno(db_url, sagas=[capped]) as one,
        storno.Storno(db_url, sagas=[capped]) as two,
        one.worker(concurrency=8, poll_interval=0.02),
        two.worker(concurrency=8, poll_interval=0.02),
    ):
        handles = [await (one if i % 2 else two).start(capped) for i in range(16)]
        for handle in handles:
            await handle.result(timeout=30)
    assert RUNNING["max"] == 2  # reached, never exceeded


async def test_waiting_runs_do_not_count_against_the_limit(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[parked]) as app, app.worker(poll_interval=0.02):
        first, second = await app.start(parked), await app.start(parked)

        async def both_waiting() -> bool:
            statuses = {await h.status() for h in (first, second)}
            return statuses == {storno.RunStatus.WAITING}

        await wait_for(both_waiting)
        await app.signal(second.run_id, "go", 2)
        await app.signal(first.run_id, "go", 1)
        assert [await first.result(timeout=5), await second.result(timeout=5)] == ["1", "2"]


def test_limit_must_be_positive() -> None:
    with pytest.raises(storno.ConfigurationError, match="max_concurrent of saga 'bad'"):

        @storno.saga(name="bad", max_concurrent=0)
        async def bad(ctx: storno.SagaContext) -> None:
            return None
