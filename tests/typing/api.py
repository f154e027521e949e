"""storno's public API as a user writes it, type-checked by mypy (strict) and never run.

tests/test_typing.py checks this file; every ``assert_type`` is a promise of the API's types,
and the ``type: ignore`` lines must stay errors (mypy's ``warn_unused_ignores`` says if one
stops being one).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, assert_type

import storno
from storno.testing import FaultInjector, VirtualClock, advance

FAST = storno.RetryPolicy(initial_interval=0.01, maximum_attempts=3, non_retryable=(KeyError,))
assert_type(FAST.maximum_attempts, int | None)


@storno.step(kind="compensable", retry=FAST)
def charge_card(ctx: storno.StepContext, amount: int) -> str:
    assert_type(ctx.idempotency_key, str)
    return f"charge-{ctx.idempotency_key}"


@charge_card.compensation
def refund_card(ctx: storno.CompensationContext[str], amount: int) -> None:
    assert_type(ctx.result, str | storno.Unknown)  # UNKNOWN: the charge's answer was lost


@storno.step
async def reserve(ctx: storno.StepContext, sku: str, quantity: int = 1) -> dict[str, int]:
    return {sku: quantity}


@storno.step(kind="pivot")
def send_confirmation(ctx: storno.StepContext, text: str) -> None:
    raise storno.TerminalError("SMS gateway refused the number")


@storno.saga
async def booking(ctx: storno.SagaContext, amount: int, sku: str = "seat") -> str:
    charge = await ctx.step(charge_card, amount)
    assert_type(charge, str)
    assert_type(await ctx.step(reserve, sku, quantity=2), dict[str, int])
    assert_type(await ctx.step(send_confirmation, "see you at 10:00"), None)
    assert_type(ctx.now(), datetime)
    await ctx.sleep(timedelta(minutes=5))
    # A step called with an argument of the wrong type is refused.
    await ctx.step(charge_card, "100")  # type: ignore[arg-type]
    return charge


@storno.saga
def tally(ctx: storno.SyncSagaContext, amounts: list[int]) -> int:
    receipts = [ctx.step(charge_card, a) for a in amounts]
    assert_type(receipts, list[str])
    return len(receipts)


@storno.saga(name="limited", max_concurrent=2)
async def limited(ctx: storno.SagaContext, n: int) -> list[int]:
    return [n]


async def main() -> None:
    clock = VirtualClock(datetime(2030, 1, 1, tzinfo=UTC))
    async with storno.Storno("sqlite:///t.db", sagas=[booking, tally, limited], clock=clock) as app:
        async with app.worker(concurrency=4):
            handle = await app.start(booking, 100, sku="table")
            assert_type(handle, storno.RunHandle[str])
            assert_type(await handle.result(timeout=10), str)
            assert_type(await handle.describe(), storno.RunInfo)
            assert_type(await app.run(tally, [1, 2]), int)
            assert_type(app.get_handle(handle.run_id), storno.RunHandle[Any])
            assert_type(await advance(app, timedelta(minutes=5)), float)
            assert_type(clock.now(), float)
            assert_type(await app.run(limited, 3), list[int])
            # The arguments are checked against the saga's.
            await app.start(booking, "100")  # type: ignore[arg-type]
        with FaultInjector() as faults:
            faults.fail(charge_card, times=2)
