"""What a run's writes cost and the paths they take: a start made durable with the run's
first write, steps appended under the lease without rewriting the run's row, batches written
on the event loop's thread unless another connection holds the SQLite file's lock, and a
restart that retries an interrupted call at once."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

import storno
from conftest import wait_for
from storno._model import Event, EventType, Lease
from storno._store import NewRun, open_store
from storno._store._sqlite import SQLiteStore
from storno.testing import FaultInjector, restart_worker


@storno.step(kind="retryable")
def one(ctx: storno.StepContext) -> int:
    return 1


@storno.step(kind="retryable")
def two(ctx: storno.StepContext) -> int:
    return 2


@storno.saga
async def pair(ctx: storno.SagaContext) -> int:
    return await ctx.step(one) + await ctx.step(two)


@pytest.mark.sqlite_only
async def test_a_run_started_here_costs_one_commit_per_step_and_one_to_end(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    async with storno.Storno(url, sagas=[pair]) as app, app.worker():
        await app.run(pair)  # warm: the worker's first claim is behind us
        store = app.store
        assert isinstance(store, SQLiteStore)
        before = store.write_counts[0]
        for _ in range(5):
            assert await app.run(pair) == 3
        # Each step's start (the first also inserts the run), then the end with the result.
        assert store.write_counts[0] - before == 5 * 3
        info = (await app.list_runs(limit=1))[0]
        assert info.status is storno.RunStatus.COMPLETED
        assert [e.type for e in (await app.describe(info.run_id)).history][:2] == [
            "run_created",
            "step_started",
        ]


async def test_start_returns_and_the_run_is_durable_while_its_body_has_not_written(
    db_url: str,
):
    gate = asyncio.Event()

    @storno.saga(name="slow_to_start")
    async def slow(ctx: storno.SagaContext) -> int:
        await gate.wait()  # not a durable wait: the body just has not reached a step yet
        return await ctx.step(one)

    async with storno.Storno(db_url, sagas=[slow]) as app, app.worker():
        handle = await asyncio.wait_for(app.start(slow), 10)
        async with storno.Storno(db_url) as other:  # another connection sees it
            record = await other.store.get_run(handle.run_id)
            assert record is not None and record.status is storno.RunStatus.RUNNING
        gate.set()
        assert await handle.result(timeout=10) == 1


async def test_starting_one_id_twice_while_it_runs_here_gives_one_run(db_url: str):
    gate = asyncio.Event()
    calls: list[str] = []

    @storno.step(kind="retryable")
    async def record_call(ctx: storno.StepContext) -> str:
        calls.append(ctx.run_id)
        await gate.wait()
        return "done"

    @storno.saga(name="once_by_id")
    async def once(ctx: storno.SagaContext) -> str:
        return await ctx.step(record_call)

    async with storno.Storno(db_url, sagas=[once]) as app, app.worker():
        first = await app.start(once.options(run_id="order-1"))
        await wait_for(lambda: asyncio.sleep(0, result=calls))
        second = await app.start(once.options(run_id="order-1"))
        with pytest.raises(storno.RunConflictError, match="already exists"):
            await app.start(pair.options(run_id="order-1"))
        gate.set()
        assert await first.result(timeout=10) == await second.result(timeout=10) == "done"
    assert calls == ["order-1"]


async def test_a_call_cut_short_by_a_stopped_worker_is_retried_without_backoff(db_url: str):
    calls = 0

    @storno.step(kind="retryable", retry=storno.RetryPolicy(initial_interval=3600))
    def slow_to_retry(ctx: storno.StepContext) -> int:
        nonlocal calls
        calls += 1
        return calls

    @storno.saga(name="interrupted")
    async def interrupted(ctx: storno.SagaContext) -> int:
        return await ctx.step(slow_to_retry)

    async with storno.Storno(db_url, sagas=[interrupted]) as app:
        with FaultInjector() as faults:
            faults.crash(slow_to_retry, when="after_call")
            worker = app.worker()
            await worker.start()
            handle = await app.start(interrupted)
            await faults.wait_for_crash()
            await restart_worker(worker)
            # With the hour-long backoff applied this would time out.
            assert await handle.result(timeout=10) == 2
        history = (await handle.describe()).history
        attempts = [e.data["attempt"] for e in history if e.type == "step_started"]
        assert attempts == [1, 2]  # the retry still counts as an attempt


async def test_an_append_under_a_stale_lease_is_refused_and_writes_nothing(db_url: str):
    store = open_store(db_url)
    await store.open()
    try:
        event = Event(0, EventType.RUN_CREATED, 1.0, None, {}, "{}")
        record, _ = await store.create_run(
            NewRun("r1", "s", "{}", 1.0, None, event), claim_for="w", lease_seconds=30
        )
        stale = Lease("r1", "w", record.epoch + 1)
        with pytest.raises(storno.LeaseLostError):
            await store.write(
                stale, [Event(1, EventType.RUN_RESUMED, 2.0)], None, now=2.0,
                lease_seconds=30, touch=False,
            )  # fmt: skip
        assert [e.seq for e in await store.history("r1")] == [0]
        current = Lease("r1", "w", record.epoch)
        await store.write(
            current, [Event(1, EventType.RUN_RESUMED, 2.0)], None, now=2.0,
            lease_seconds=30, touch=False,
        )  # fmt: skip
        assert [e.seq for e in await store.history("r1")] == [0, 1]
        after = await store.get_run("r1")
        assert after is not None and after.updated_at == 1.0  # the row was left as it was
    finally:
        await store.close()


@pytest.mark.sqlite_only
async def test_writes_wait_for_a_lock_held_by_another_connection(tmp_path: Path):
    path = tmp_path / "x.db"
    async with storno.Storno(f"sqlite:///{path}", sagas=[pair]) as app, app.worker():
        assert await app.run(pair) == 3
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process writing, say
        try:
            running = asyncio.create_task(app.run(pair))
            await asyncio.sleep(0.2)
            assert not running.done()  # its first write cannot commit while the lock is held
        finally:
            holder.execute("COMMIT")
            holder.close()
        assert await asyncio.wait_for(running, 10) == 3
        assert await app.run(pair) == 3  # and the loop's own path works again
