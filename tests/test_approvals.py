"""Approvals are operators' decisions, not signals; repeated message ids after a run ended.

On real stores (SQLite and PostgreSQL): an approval answers the wait that asked for it, a
decision given before the run asks is refused (or taken, when the saga says so), reserved
signal names cannot be sent, and a retried delivery after the run ended is a duplicate.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

import storno
from conftest import wait_for

LEDGER: list[str] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    LEDGER.clear()


@storno.step(kind="compensable")
def hold(ctx: storno.StepContext, what: str) -> str:
    LEDGER.append(f"hold {what}")
    return what


@hold.compensation
def unhold(ctx: storno.CompensationContext[str], what: str) -> None:
    LEDGER.append(f"unhold {what}")


@storno.saga
async def refund(ctx: storno.SagaContext, amount: int) -> str:
    await ctx.wait_for_signal("requested")
    await ctx.step(hold, f"refund {amount}")
    approval = await ctx.wait_for_approval(timeout=timedelta(days=1))
    return f"approved by {approval.by}"


@storno.saga(early_approvals=True)
async def prepaid(ctx: storno.SagaContext) -> str:
    await ctx.wait_for_signal("requested")
    approval = await ctx.wait_for_approval()
    return f"approved by {approval.by}"


@storno.saga(early_approvals=True)
async def strict_wait(ctx: storno.SagaContext) -> str:
    await ctx.wait_for_signal("requested")
    approval = await ctx.wait_for_approval(early=False)
    return f"approved by {approval.by}"


SAGAS = [refund, prepaid, strict_wait]


async def _waits_for_approval(app: storno.Storno, run_id: str) -> bool:
    info = await app.describe(run_id)
    starts = [e for e in info.history if e.type == "signal_wait_started" and e.data.get("approval")]
    return info.status is storno.RunStatus.WAITING and bool(starts)


async def _status(app: storno.Storno, run_id: str, status: storno.RunStatus) -> bool:
    return await app.get_handle(run_id).status() is status


async def test_an_approval_before_the_run_asks_is_refused(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=SAGAS) as app, app.worker():
        handle = await app.start(refund, 30)
        await wait_for(lambda: _status(app, handle.run_id, storno.RunStatus.WAITING))
        with pytest.raises(storno.RunStateError, match="not waiting for an approval"):
            await app.approve(handle.run_id, by="alice")
        with pytest.raises(storno.RunStateError, match="early_approvals=True"):
            await app.reject(handle.run_id, by="alice", reason="no")
        await app.signal(handle.run_id, "requested")
        await wait_for(lambda: _waits_for_approval(app, handle.run_id))
        assert await app.approve(handle.run_id, by="bob", note="checked")
        with pytest.raises(storno.RunStateError, match="already has a decision on its way"):
            await app.reject(handle.run_id, by="carol", reason="too late")
        assert await handle.result(timeout=5) == "approved by bob"
        info = await app.describe(handle.run_id)
        with pytest.raises(storno.RunStateError, match="has already ended"):
            await app.approve(handle.run_id, by="dave")
    received = [e for e in info.history if e.type == "signal_received" and e.data.get("approval")]
    assert [e.data["by"] for e in received] == ["bob"]
    assert LEDGER == ["hold refund 30"]


async def test_a_saga_may_declare_that_approvals_come_early(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=SAGAS) as app, app.worker():
        taken = await app.start(prepaid)
        ignored = await app.start(strict_wait)
        for handle in (taken, ignored):
            await wait_for(lambda h=handle: _status(app, h.run_id, storno.RunStatus.WAITING))
            assert await app.approve(handle.run_id, by="early-bird")
            await app.signal(handle.run_id, "requested")
        assert await taken.result(timeout=5) == "approved by early-bird"
        # early=False: the decision given before the wait began is journaled, never taken.
        await wait_for(lambda: _waits_for_approval(app, ignored.run_id))
        info = await app.describe(ignored.run_id)
        assert [e.data["by"] for e in info.history if e.type == "approval_ignored"] == [
            "early-bird"
        ]
        assert info.status is storno.RunStatus.WAITING
        await app.approve(ignored.run_id, by="on-time")
        assert await ignored.result(timeout=5) == "approved by on-time"


async def test_approvals_cannot_be_sent_as_signals(db_url: str) -> None:
    @storno.saga
    async def sneaky(ctx: storno.SagaContext) -> None:
        await ctx.wait_for_signal("storno.approval")

    async with storno.Storno(db_url, sagas=[*SAGAS, sneaky]) as app, app.worker():
        handle = await app.start(refund, 5)
        await app.signal(handle.run_id, "requested")
        await wait_for(lambda: _waits_for_approval(app, handle.run_id))
        for name in ("storno.approval", "storno.anything"):
            with pytest.raises(storno.ConfigurationError, match="reserved for storno"):
                await app.signal(handle.run_id, name, {"approved": True, "by": "cfo"})
        waiting = await app.start(sneaky)
        with pytest.raises(storno.RunFailedError, match="reserved for storno"):
            await waiting.result(timeout=5)
        assert await handle.status() is storno.RunStatus.WAITING


async def test_the_approval_timeout_message_is_about_approval(db_url: str) -> None:
    from storno.testing import VirtualClock, advance

    clock = VirtualClock()
    async with storno.Storno(db_url, sagas=SAGAS, clock=clock) as app, app.worker():
        handle = await app.start(refund, 7)
        await app.signal(handle.run_id, "requested")
        await wait_for(lambda: _waits_for_approval(app, handle.run_id))
        await advance(app, timedelta(days=1, minutes=1))
        with pytest.raises(storno.RunCompensatedError) as caught:
            await handle.result(timeout=5)
    message = str(caught.value)
    assert "no approval came before the wait's timeout" in message
    assert "wait_for_signal" not in message and "storno.approval" not in message
    assert LEDGER == ["hold refund 7", "unhold refund 7"]


async def test_a_repeated_message_id_after_the_run_ended_is_a_duplicate(db_url: str) -> None:
    @storno.saga
    async def callback(ctx: storno.SagaContext) -> object:
        return await ctx.wait_for_signal("paid")

    async with storno.Storno(db_url, sagas=[callback]) as app, app.worker():
        handle = await app.start(callback)
        assert await app.signal(handle.run_id, "paid", {"n": 1}, id="evt-1") is True
        assert await handle.result(timeout=5) == {"n": 1}
        # The provider never heard the answer and retries: a duplicate, not an error.
        assert await app.signal(handle.run_id, "paid", {"n": 1}, id="evt-1") is False
        with pytest.raises(storno.RunStateError, match="has already ended"):
            await app.signal(handle.run_id, "paid", {"n": 2}, id="evt-2")
        with pytest.raises(storno.RunStateError, match="has already ended"):
            await app.signal(handle.run_id, "paid", {"n": 3})
