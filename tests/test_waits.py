"""Durable waits: sleep, signals, approval, queries and scheduled starts, on real SQLite files."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import storno
from conftest import wait_for

LEDGER: list[str] = []


@storno.step(kind="retryable")
def note(ctx: storno.StepContext, text: str) -> str:
    LEDGER.append(text)
    return text


@pytest.fixture(autouse=True)
def _clear() -> None:
    LEDGER.clear()


async def _status(app: storno.Storno, run_id: str) -> storno.RunStatus:
    return await app.get_handle(run_id).status()


async def _events(app: storno.Storno, run_id: str) -> list[str]:
    return [e.type for e in (await app.describe(run_id)).history]


async def test_sleep_releases_the_run_and_wakes_it_on_time(db_url: str) -> None:
    @storno.saga
    async def nap(ctx: storno.SagaContext) -> float:
        await ctx.step(note, "before")
        started = time.time()
        await ctx.sleep(0.3)
        await ctx.step(note, "after")
        return started

    async with storno.Storno(db_url, sagas=[nap]) as app, app.worker() as worker:
        handle = await app.start(nap)
        await wait_for(
            lambda: _is(app, handle.run_id, storno.RunStatus.WAITING), timeout=5, interval=0.005
        )
        # A waiting run holds no task in the worker (its task ends just after the write).
        await wait_for(lambda: _none(worker.active_runs))
        record = await app.store.get_run(handle.run_id)
        assert record is not None and record.owner is None and record.wake_at is not None
        await handle.result(timeout=5)
        info = await app.describe(handle.run_id)
    assert LEDGER == ["before", "after"]  # the step before the sleep ran once, not on replay
    types = [e.type for e in info.history]
    assert types.count("timer_started") == 1 and types.count("timer_fired") == 1
    woke = next(e for e in info.history if e.type == "timer_fired").at
    timer = next(e for e in info.history if e.type == "timer_started")
    assert woke >= timer.data["until"]  # never before the wake time
    assert timer.data["until"] - timer.at == pytest.approx(0.3, abs=0.05)


async def _none(items: list[str]) -> bool:
    return not items


async def _is(app: storno.Storno, run_id: str, status: storno.RunStatus) -> bool:
    return await _status(app, run_id) is status


async def test_sleep_survives_closing_every_process_object(db_url: str) -> None:
    @storno.saga
    async def later(ctx: storno.SagaContext) -> str:
        await ctx.sleep(timedelta(seconds=0.4))
        return await ctx.step(note, "woke")

    async with storno.Storno(db_url, sagas=[later]) as app, app.worker():
        handle = await app.start(later)
        await wait_for(lambda: _is(app, handle.run_id, storno.RunStatus.WAITING))
    # A new application (as after a restart) picks the sleeping run up when it is due.
    async with storno.Storno(db_url, sagas=[later]) as app, app.worker(poll_interval=0.05):
        assert await app.get_handle(handle.run_id).result(timeout=5) == "woke"


async def test_sleep_until_needs_an_aware_datetime(db_url: str) -> None:
    @storno.saga
    async def naive(ctx: storno.SagaContext) -> None:
        await ctx.sleep_until(datetime(2030, 1, 1))

    async with storno.Storno(db_url, sagas=[naive]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="aware datetime"):
            await app.run(naive)


async def test_signal_sent_before_the_wait_is_buffered_and_delivered_in_order(
    db_url: str,
) -> None:
    @storno.saga
    async def collect(ctx: storno.SagaContext) -> list[Any]:
        await ctx.sleep(0.2)
        first = await ctx.wait_for_signal("item")
        second = await ctx.wait_for_signal("item")
        return [first, second]

    async with storno.Storno(db_url, sagas=[collect]) as app, app.worker():
        handle = await app.start(collect)
        assert await app.signal(handle.run_id, "item", {"n": 1}, id="a")
        assert not await app.signal(handle.run_id, "item", {"n": 1}, id="a")  # repeated id
        assert await app.signal(handle.run_id, "item", {"n": 2})
        assert await handle.result(timeout=5) == [{"n": 1}, {"n": 2}]
        info = await app.describe(handle.run_id)
    received = [e for e in info.history if e.type == "signal_received"]
    assert [e.data["inbox_seq"] for e in received] == [1, 2]


async def test_signal_wakes_a_waiting_run_and_its_data_is_recorded(db_url: str) -> None:
    @storno.saga
    async def greet(ctx: storno.SagaContext) -> str:
        name = await ctx.wait_for_signal("name")
        return await ctx.step(note, f"hello {name}")

    async with storno.Storno(db_url, sagas=[greet]) as app, app.worker(poll_interval=30):
        handle = await app.start(greet)
        await wait_for(lambda: _is(app, handle.run_id, storno.RunStatus.WAITING))
        await app.signal(handle.run_id, "name", "Ada")
        # The 30 s poll cannot be what wakes it: the signal does.
        assert await handle.result(timeout=5) == "hello Ada"


async def test_signal_timeout_raises_or_returns_the_default(db_url: str) -> None:
    @storno.saga
    async def patient(ctx: storno.SagaContext) -> str:
        return str(await ctx.wait_for_signal("go", timeout=0.2, default="no answer"))

    @storno.saga
    async def strict(ctx: storno.SagaContext) -> str:
        return str(await ctx.wait_for_signal("go", timeout=0.2))

    async with storno.Storno(db_url, sagas=[patient, strict]) as app, app.worker():
        assert await app.run(patient) == "no answer"
        with pytest.raises(storno.RunCompensatedError, match="no signal 'go'"):
            await app.run(strict)


async def test_signal_to_unknown_or_ended_run_is_refused(db_url: str) -> None:
    @storno.saga
    async def quick(ctx: storno.SagaContext) -> int:
        return 1

    async with storno.Storno(db_url, sagas=[quick]) as app, app.worker():
        with pytest.raises(storno.RunNotFoundError):
            await app.signal("nope", "x")
        handle = await app.start(quick)
        await handle.result(timeout=5)
        with pytest.raises(storno.RunStateError, match="already ended"):
            await app.signal(handle.run_id, "x")


@storno.step(kind="compensable")
def reserve(ctx: storno.StepContext, what: str) -> str:
    LEDGER.append(f"reserve {what}")
    return what


@reserve.compensation
def release(ctx: storno.CompensationContext[str], what: str) -> None:
    LEDGER.append(f"release {what}")


@storno.saga
async def refund(ctx: storno.SagaContext, amount: int) -> str:
    await ctx.step(reserve, f"refund {amount}")
    ctx.publish("phase", "awaiting approval")
    approval = await ctx.wait_for_approval(timeout=timedelta(days=3))
    ctx.publish("phase", "approved")
    return f"approved by {approval.by}"


async def test_approval_and_rejection_are_in_the_history(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[refund]) as app, app.worker():
        yes = await app.start(refund, 10)
        no = await app.start(refund, 20)
        for handle in (yes, no):
            await wait_for(lambda h=handle: _is(app, h.run_id, storno.RunStatus.WAITING))
        assert await app.query(yes.run_id, "phase") == "awaiting approval"
        await app.approve(yes.run_id, by="alice", note="looks fine")
        await app.reject(no.run_id, by="bob", reason="duplicate request")
        assert await yes.result(timeout=5) == "approved by alice"
        with pytest.raises(storno.RunCompensatedError, match="rejected by bob"):
            await no.result(timeout=5)
        assert await app.query(yes.run_id) == {"phase": "approved"}
        history = (await app.describe(no.run_id)).history
    decision = next(e for e in history if e.type == "signal_received")
    assert decision.data["approval"] is True and decision.data["by"] == "bob"
    assert "release refund 20" in LEDGER and "release refund 10" not in LEDGER


async def test_query_of_unknown_name_lists_the_published_ones(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[refund]) as app, app.worker():
        handle = await app.start(refund, 1)
        await wait_for(lambda: _is(app, handle.run_id, storno.RunStatus.WAITING))
        with pytest.raises(LookupError, match="published: phase"):
            await app.query(handle.run_id, "progress")


async def test_scheduled_start_waits_for_its_time(db_url: str) -> None:
    @storno.saga
    async def hello(ctx: storno.SagaContext) -> float:
        return time.time()

    async with storno.Storno(db_url, sagas=[hello]) as app, app.worker():
        asked = time.time()
        handle = await app.start(hello.options(start_delay=0.3))
        assert await handle.status() is storno.RunStatus.PENDING
        started = await handle.result(timeout=5)
        at = datetime.now(UTC) + timedelta(seconds=0.2)
        later = await app.start(hello.options(start_at=at))
        started_at = await later.result(timeout=5)
    assert started >= asked + 0.3
    assert started_at >= at.timestamp()


def test_scheduled_start_options_are_checked() -> None:
    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        return None

    with pytest.raises(storno.ConfigurationError, match="aware datetime"):
        s.options(start_at=datetime(2030, 1, 1))
    with pytest.raises(storno.ConfigurationError, match="not both"):
        s.options(start_at=datetime.now(UTC), start_delay=1)


async def test_changed_code_at_a_wait_position_parks_the_run(db_url: str) -> None:
    @storno.saga(name="shifty")
    async def v1(ctx: storno.SagaContext) -> None:
        await ctx.wait_for_signal("go")

    @storno.saga(name="shifty")
    async def v2(ctx: storno.SagaContext) -> None:
        await ctx.step(note, "oops")

    async with storno.Storno(db_url, sagas=[v1]) as app, app.worker():
        handle = await app.start(v1)
        await wait_for(lambda: _is(app, handle.run_id, storno.RunStatus.WAITING))
    async with storno.Storno(db_url, sagas=[v2]) as app, app.worker():
        await app.signal(handle.run_id, "go")
        with pytest.raises(storno.NeedsAttentionError, match="a wait for signal 'go'"):
            await app.get_handle(handle.run_id).result(timeout=5)
    assert LEDGER == []


async def test_plain_function_sagas_wait_too(db_url: str) -> None:
    @storno.saga(early_approvals=True)  # the approval below is given before the run asks
    def sync_flow(ctx: storno.SyncSagaContext) -> str:
        ctx.step(note, "one")
        ctx.sleep(0.05)
        ctx.publish("phase", "waiting")
        got = ctx.wait_for_signal("go")
        approval = ctx.wait_for_approval()
        return f"{got} {approval.by}"

    async with storno.Storno(db_url, sagas=[sync_flow]) as app, app.worker():
        handle = await app.start(sync_flow)
        await app.signal(handle.run_id, "go", "went")
        await app.approve(handle.run_id, by="kim")
        assert await handle.result(timeout=5) == "went kim"
    assert LEDGER == ["one"]


async def test_gather_with_a_waiting_branch_waits_for_it(db_url: str) -> None:
    @storno.saga
    async def mixed(ctx: storno.SagaContext) -> list[Any]:
        return await ctx.gather(ctx.step(note, "now"), ctx.wait_for_signal("later"))

    async with storno.Storno(db_url, sagas=[mixed]) as app, app.worker():
        handle = await app.start(mixed)
        await wait_for(lambda: _is(app, handle.run_id, storno.RunStatus.WAITING))
        await app.signal(handle.run_id, "later", 42)
        assert await handle.result(timeout=5) == ["now", 42]
    assert LEDGER == ["now"]  # the finished branch was not called again on replay


async def test_a_three_day_approval_timeout_runs_in_virtual_time(db_url: str) -> None:
    from storno.testing import VirtualClock, advance

    clock = VirtualClock()
    started = time.monotonic()
    async with storno.Storno(db_url, sagas=[refund], clock=clock) as app, app.worker():
        handle = await app.start(refund, 30)
        await wait_for(lambda: _is(app, handle.run_id, storno.RunStatus.WAITING))
        await advance(app, timedelta(days=2, hours=23))
        await asyncio.sleep(0.05)
        assert await handle.status() is storno.RunStatus.WAITING  # not yet
        await advance(app, timedelta(hours=2))
        with pytest.raises(storno.RunCompensatedError, match="no approval came before"):
            await handle.result(timeout=5)
    assert time.monotonic() - started < 5  # three days in well under a second or two
    assert "release refund 30" in LEDGER
