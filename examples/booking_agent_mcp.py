"""The booking agent of seed 000, with its tools in an MCP server: book a slot, charge the
card, text the customer, sync the calendar. The calendar refuses, so the writes done so far
are undone in reverse through the server's own undo tools: an apology for the text, a refund,
the slot released.

The server (a FastMCP server with a fake payments API, in this process, over the MCP SDK's
in-memory transport) says nothing about what can be undone: the classification below does.
Each write carries its step's idempotency key in the request's ``_meta``, and the payments API
charges once per key. The model is scripted (no network). Run it with
``python examples/booking_agent_mcp.py``, then look at the run with the command it prints.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from mcp.server.fastmcp import Context, FastMCP
from mcp.shared.memory import create_connected_server_and_client_session
from mcp.types import ToolAnnotations

import storno
from storno import agents
from storno.agents import mcp

Call, Turn = agents.ToolCall, agents.ModelTurn
ledger: list[str] = []  # what the salon's systems saw
charges: dict[str, str] = {}  # the payments API: idempotency key -> charge id
server = FastMCP("salon", log_level="WARNING")
READ, WRITE = ToolAnnotations(readOnlyHint=True), ToolAnnotations(readOnlyHint=False)


def key(ctx: Context[Any, Any, Any]) -> str:
    meta = ctx.request_context.meta
    return str((meta.model_extra or {}).get("storno/idempotency_key") if meta else None)


@server.tool(annotations=READ)
def free_slots(day: str) -> list[str]:
    """The free slots of the salon on a day (YYYY-MM-DD)."""
    return ["10:00", "14:30"]


@server.tool(annotations=WRITE)
def book_slot(day: str, slot: str) -> str:
    """Book a slot for the customer."""
    ledger.append(f"booked {day} {slot}")
    return f"booking-{day}-{slot}"


@server.tool(annotations=WRITE)
def release_slot(day: str, slot: str) -> None:
    """Release a booked slot."""
    ledger.append(f"released {day} {slot}")


@server.tool(annotations=WRITE)
def charge_card(customer: str, amount: int, ctx: Context[Any, Any, Any]) -> dict[str, Any]:
    """Charge the customer's card (in euros)."""
    if key(ctx) not in charges:  # a repeat under the same key is the same charge
        charges[key(ctx)] = f"ch-{len(charges) + 1}"
        ledger.append(f"charged {customer} {amount} as {charges[key(ctx)]}")
    return {"charge": charges[key(ctx)], "customer": customer, "amount": amount}


@server.tool(annotations=WRITE)
def refund(charge: str) -> None:
    """Refund a charge."""
    ledger.append(f"refunded {charge}")


@server.tool(annotations=WRITE)
def send_sms(phone: str, text: str) -> str:
    """Text the customer."""
    ledger.append(f"sms to {phone}: {text}")
    return "sms-1"


@server.tool(annotations=WRITE)
def send_apology(phone: str) -> None:
    """Apologise to the customer by text."""
    ledger.append(f"sms to {phone}: sorry, your booking could not be completed")


@server.tool(annotations=WRITE)
def sync_calendar(day: str, slot: str) -> str:
    """Put the booking in the stylist's calendar."""
    raise RuntimeError("the calendar API refuses: the stylist is on holiday")


@server.tool(annotations=WRITE)
def remove_from_calendar(day: str, slot: str) -> None:
    """Remove a booking from the stylist's calendar."""
    ledger.append("calendar entry removed")


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True))
def close_account(customer: str) -> None:
    """Close the customer's account."""
    ledger.append(f"closed {customer}")  # never: the classification leaves it out


ONCE = storno.RetryPolicy(maximum_attempts=1)
CLASSIFICATION = {
    "free_slots": mcp.read(),
    "book_slot": mcp.write("compensable", compensate="release_slot"),
    "charge_card": mcp.write(
        "compensable", compensate="refund", compensate_arguments={"charge": "result.charge"}
    ),
    "send_sms": mcp.write(
        "compensable", compensate="send_apology", compensate_arguments={"phone": "arguments.phone"}
    ),
    "sync_calendar": mcp.write("compensable", compensate="remove_from_calendar", retry=ONCE),
}
tools = agents.ToolRegistry()  # filled from the server in main()


def model() -> agents.ScriptedModel:
    return agents.ScriptedModel(
        [
            Turn(tool_calls=[Call("c1", "free_slots", {"day": "2026-12-04"})]),
            Turn(
                tool_calls=[
                    Call("c2", "book_slot", {"day": "2026-12-04", "slot": "10:00"}),
                    Call("c3", "charge_card", {"customer": "ada", "amount": 65}),
                ]
            ),
            Turn(tool_calls=[Call("c4", "close_account", {"customer": "ada"})]),
            Turn(
                tool_calls=[
                    Call("c5", "send_sms", {"phone": "+431234", "text": "See you Fri 10:00"})
                ]
            ),
            Turn(tool_calls=[Call("c6", "sync_calendar", {"day": "2026-12-04", "slot": "10:00"})]),
            Turn(text="booked"),
        ]
    )


@storno.saga
async def booking_agent(ctx: storno.SagaContext, request: str) -> str:
    return await agents.run_agent(ctx, model(), tools, request)


async def main(url: str) -> None:
    async with create_connected_server_and_client_session(server) as session:
        for row in await mcp.register(tools, session, CLASSIFICATION):
            print(row)  # the classification next to what the server says of each tool
        steps = tools.steps()
        async with storno.Storno(url, sagas=[booking_agent], steps=steps) as app, app.worker():
            handle = await app.start(booking_agent, "Ada wants a cut on Friday morning")
            try:
                await handle.result(timeout=30)
            except storno.RunCompensatedError as exc:
                print(f"compensated: {exc.error.get('message')}")
    print("\n".join(ledger))
    print(f"see it with: storno show {handle.run_id} --db {url}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///booking-agent-mcp.db"))
