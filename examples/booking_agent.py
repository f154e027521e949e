"""The booking agent of seed 000: book a slot, charge the card, text the customer, sync the
calendar. The calendar refuses, so the writes done so far are undone in reverse: an apology
for the text, a refund, the slot released. A charge above 500 waits for an operator.

The model is scripted (no network): it answers as a real one would, turn by turn. Run it with
``python examples/booking_agent.py``, then look at the run with the command it prints.
"""

from __future__ import annotations

import asyncio
import sys

import storno
from storno import agents

Call, Turn = agents.ToolCall, agents.ModelTurn
ledger: list[str] = []  # what the other systems saw
tools = agents.ToolRegistry()


@tools.read
def free_slots(ctx: agents.ToolContext, day: str) -> list[str]:
    """The free slots of the salon on a day (YYYY-MM-DD)."""
    return ["10:00", "14:30"]


@tools.write(kind="compensable")
def book_slot(ctx: storno.StepContext, day: str, slot: str) -> str:
    """Book a slot for the customer."""
    ledger.append(f"booked {day} {slot}")
    return f"booking-{ctx.idempotency_key[-6:]}"


@book_slot.compensation
def release_slot(ctx: storno.CompensationContext[str], day: str, slot: str) -> None:
    ledger.append(f"released {day} {slot}")


@tools.write(kind="compensable", approval=lambda args: args["amount"] > 500)
def charge_card(ctx: storno.StepContext, customer: str, amount: int) -> str:
    """Charge the customer's card (in euros); above 500 an operator approves first."""
    ledger.append(f"charged {customer} {amount}")  # the key goes to the provider
    return f"charge-{ctx.idempotency_key[-6:]}"


@charge_card.compensation
def refund_card(ctx: storno.CompensationContext[str], customer: str, amount: int) -> None:
    ledger.append(f"refunded {customer} {amount}")


@tools.write(kind="compensable")
def send_sms(ctx: storno.StepContext, phone: str, text: str) -> str:
    """Text the customer."""
    ledger.append(f"sms to {phone}: {text}")
    return "sms-1"


@send_sms.compensation
def send_apology(ctx: storno.CompensationContext[str], phone: str, text: str) -> None:
    ledger.append(f"sms to {phone}: sorry, your booking could not be completed")


@tools.write(kind="compensable")
def sync_calendar(ctx: storno.StepContext, day: str, slot: str) -> str:
    """Put the booking in the stylist's calendar."""
    raise storno.TerminalError("the calendar API refuses: the stylist is on holiday")


@sync_calendar.compensation
def remove_from_calendar(ctx: storno.CompensationContext[str], day: str, slot: str) -> None:
    ledger.append("calendar entry removed")


def model() -> agents.ScriptedModel:
    return agents.ScriptedModel(
        [
            Turn(tool_calls=[Call("c1", "free_slots", {"day": "2026-12-04"})]),
            Turn(
                tool_calls=[
                    Call("c2", "book_slot", {"day": "2026-12-04", "slot": "10:00"}),
                    Call("c3", "charge_card", {"customer": "ada", "amount": 650}),
                ]
            ),
            Turn(
                tool_calls=[
                    Call("c4", "send_sms", {"phone": "+431234", "text": "See you Fri 10:00"})
                ]
            ),
            Turn(tool_calls=[Call("c5", "sync_calendar", {"day": "2026-12-04", "slot": "10:00"})]),
            Turn(text="booked"),
        ]
    )


@storno.saga
async def booking_agent(ctx: storno.SagaContext, request: str) -> str:
    return await agents.run_agent(ctx, model(), tools, request)


async def waiting_for_approval(app: storno.Storno, run_id: str) -> dict[str, object]:
    """What the run asks to approve, once it waits for it (as the dashboard shows it)."""
    for _ in range(1000):
        info = await app.describe(run_id)
        asked = [e.data for e in info.history if e.type == "signal_wait_started"]
        if info.status is storno.RunStatus.WAITING and asked:
            return asked[-1]
        await asyncio.sleep(0.01)
    raise TimeoutError(f"run {run_id} did not ask for an approval")


async def main(url: str) -> None:
    async with storno.Storno(url, sagas=[booking_agent], steps=tools.steps()) as app, app.worker():
        handle = await app.start(booking_agent, "Ada wants the full treatment on Friday morning")
        # The charge is above 500: an operator sees what is asked and approves that alone.
        asked = await waiting_for_approval(app, handle.run_id)
        print(f"approval asked for {asked['subject']}")
        await app.approve(handle.run_id, by="maria", digest=asked["digest"])
        try:
            await handle.result(timeout=30)
        except storno.RunCompensatedError as exc:
            print(f"compensated: {exc.error.get('message')}")
        print("\n".join(ledger))
        print(f"see it with: storno show {handle.run_id} --db {url}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///booking-agent.db"))
