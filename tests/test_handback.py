"""A stopping worker hands its runs in flight back: another worker claims them at once, by the
engine's clock (not the wall's), on both backends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import storno
from conftest import wait_for
from storno.testing import VirtualClock

LEASE = 30.0


async def test_a_stopping_worker_hands_back_its_runs_in_flight(db_url: str):
    # Far from the wall's time on purpose: the hand-back must not depend on it.
    clock = VirtualClock(datetime(2001, 1, 1, tzinfo=UTC))
    entered: list[str] = []
    gate = asyncio.Event()

    @storno.step(kind="retryable")
    async def hold(ctx: storno.StepContext, n: int) -> int:
        entered.append(ctx.run_id)
        await gate.wait()
        return n

    @storno.saga
    async def held(ctx: storno.SagaContext, n: int) -> int:
        return await ctx.step(hold, n)

    first = storno.Storno(db_url, sagas=[held], clock=clock, lease_seconds=LEASE)
    second = storno.Storno(db_url, sagas=[held], clock=clock, lease_seconds=LEASE)
    async with first, second:
        leaving = first.worker(worker_id="leaving")
        await leaving.start()
        handles = [await first.start(held, n) for n in range(3)]
        await wait_for(lambda: asyncio.sleep(0, len(set(entered)) == 3))
        await leaving.stop(grace=0.01)
        gate.set()
        started = clock.now()
        # The other worker polls often; only a handed-back lease lets it in before the
        # lease would have expired (the virtual clock stands still meanwhile).
        async with second.worker(worker_id="taking", poll_interval=0.02):
            results = [await second.get_handle(h.run_id).result(timeout=10) for h in handles]
        assert results == [0, 1, 2]
        assert clock.now() < started + LEASE
        for handle in handles:
            info = await second.get_handle(handle.run_id).describe()
            assert info.status is storno.RunStatus.COMPLETED
