"""The Restate services (Python SDK ``restate-sdk``), served with hypercorn.

As Restate's documentation writes a saga: a handler that runs each step in ``ctx.run`` and
keeps a list of compensations; a step that raises ``TerminalError`` ends the forward path and
the handler runs the compensations in reverse (each in ``ctx.run`` too), then re-raises.
Restate has no saga construct of its own. The idempotency key a W3 step sends to the provider
is a ``ctx.uuid()`` drawn before the call (deterministic on replay), as Restate's docs
recommend for calls to other systems.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import restate

from bench import common

booking = restate.Service("Booking")
w3_booking = restate.Service("W3Booking")
parked = restate.Workflow("Parked")


async def book_slot() -> str:
    return "slot"


async def charge_card() -> str:
    return "charge"


async def send_sms() -> str:
    return "sms"


async def sync_calendar(fail: bool) -> str:
    if fail:
        raise restate.TerminalError(common.W2_ERROR)
    return "calendar"


async def release_slot() -> None:
    return None


async def refund_card() -> None:
    return None


async def send_correction_sms() -> None:
    return None


@booking.handler()
async def run(ctx: restate.Context, req: dict[str, Any]) -> list[str]:
    compensations: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    try:
        slot = await ctx.run_typed("book_slot", book_slot)
        compensations.append(("release_slot", release_slot))
        charge = await ctx.run_typed("charge_card", charge_card)
        compensations.append(("refund_card", refund_card))
        sms = await ctx.run_typed("send_sms", send_sms)
        compensations.append(("send_correction_sms", send_correction_sms))
        calendar = await ctx.run_typed("sync_calendar", sync_calendar, fail=bool(req["fail"]))
    except restate.TerminalError:
        for name, compensate in reversed(compensations):
            await ctx.run_typed(name, compensate)
        raise
    return [slot, charge, sms, calendar]


async def _undo() -> None:
    return None


@w3_booking.handler("run")
async def w3_run(ctx: restate.Context, req: dict[str, Any]) -> list[str]:
    saga_id = str(req["id"])
    results: list[str] = []
    compensations: list[str] = []
    try:
        for step in common.STEP_NAMES:
            key = str(ctx.uuid())

            async def call(step: str = step, key: str = key) -> str:
                return await common.provider_call(saga_id, step, key)

            results.append(await ctx.run_typed(step, call))
            compensations.append(f"undo_{step}")
    except restate.TerminalError:
        for name in reversed(compensations):
            await ctx.run_typed(name, _undo)
        raise
    return results


async def _prepare() -> str:
    return "ready"


async def _note_wake() -> float:
    return time.time()


@parked.main(name="run")
async def parked_run(ctx: restate.WorkflowContext) -> float:
    await ctx.run_typed("prepare", _prepare)
    await ctx.promise("wake").value()
    return await ctx.run_typed("note_wake", _note_wake)


@parked.handler()
async def wake(ctx: restate.WorkflowSharedContext) -> None:
    await ctx.promise("wake").resolve("go")


app = restate.app(services=[booking, w3_booking, parked])
