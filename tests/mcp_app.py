"""The application `storno mcp` serves in tests/test_mcp_server.py: a refund that waits for an
operator's approval, and two steps a plan may use."""

from __future__ import annotations

import storno


@storno.step(kind="compensable")
def hold(ctx: storno.StepContext, amount: int) -> str:
    return f"held {amount}"


@hold.compensation
def unhold(ctx: storno.CompensationContext[str], amount: int) -> None:
    pass


@storno.step(kind="pivot")
def pay(ctx: storno.StepContext, amount: int) -> str:
    return f"paid {amount}"


@storno.saga
async def refund(ctx: storno.SagaContext, amount: int) -> str:
    """Hold a refund, wait for an operator's approval, then pay it."""
    await ctx.step(hold, amount)
    approval = await ctx.wait_for_approval(subject={"refund": amount})
    return f"refunded {amount}, approved by {approval.by}"


app = storno.Storno(sagas=[refund], steps=[hold, pay])
