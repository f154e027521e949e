"""The sagas whose recorded histories tests/histories/ holds (see tests/test_histories.py).

Every step body and compensation notes its call in ``CALLS``: a replay that re-ran one would
show it there.
"""

from __future__ import annotations

from typing import Any

import storno

CALLS: list[str] = []
FAST = storno.RetryPolicy(initial_interval=0.001, maximum_interval=0.01, maximum_attempts=2)


@storno.step(kind="compensable", compensate=lambda ctx, amount: CALLS.append("refund"))
def charge(ctx: storno.StepContext, amount: int) -> str:
    CALLS.append("charge")
    return f"charge-{amount}"


@storno.step(kind="compensable", compensate=lambda ctx, sku: CALLS.append("release"))
def reserve(ctx: storno.StepContext, sku: str) -> dict[str, str]:
    CALLS.append("reserve")
    return {"sku": sku, "slot": "A-1"}


@storno.step(kind="pivot", retry=FAST)
def confirm(ctx: storno.StepContext, text: str) -> str:
    CALLS.append("confirm")
    if text == "refused":
        raise storno.TerminalError("the gateway refused the number")
    return f"sent: {text}"


@storno.step(kind="retryable")
def notify(ctx: storno.StepContext, text: str) -> str:
    CALLS.append("notify")
    return text


@storno.saga
async def booking(ctx: storno.SagaContext, amount: int, text: str) -> dict[str, Any]:
    receipt = await ctx.step(charge, amount)
    slot = await ctx.step(reserve, "seat")
    sent = await ctx.step(confirm, text)
    return {"receipt": receipt, "slot": slot, "sent": sent, "at": ctx.now().isoformat()}


@storno.saga
async def approved_booking(ctx: storno.SagaContext, amount: int) -> str:
    receipt = await ctx.step(charge, amount)
    answer = await ctx.wait_for_signal("go")
    await ctx.step(notify, f"{receipt} {answer['by']}")
    return receipt


@storno.saga
async def shipping(ctx: storno.SagaContext, amount: int) -> str:
    receipt = await ctx.step(charge, amount)
    await ctx.step(reserve, "parcel")
    return receipt


@storno.saga(name="shipping")
async def shipping_as_it_was(ctx: storno.SagaContext, amount: int) -> str:
    """The code ``shipping``'s recorded history was made by: it notified where the current
    code reserves, so replaying that history against the current code must fail."""
    receipt = await ctx.step(charge, amount)
    await ctx.step(notify, "shipped")
    return receipt


SAGAS = [booking, approved_booking, shipping]
