"""The booking tools the adapters' tests share: a registry whose tools note what the world
saw (calls and their idempotency keys), with switches for a flaky booking and a declined card."""

from __future__ import annotations

import time
from typing import Any

import storno
from storno import agents

__all__ = ["Shop"]


class Shop:
    """A registry of booking tools that note what the world saw (calls and their keys)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.keys: list[tuple[str, str]] = []
        self.flaky: set[str] = set()  # tools whose next call reaches the provider and fails
        self.declined = False  # the card provider declines, after a moment
        tools = self.tools = agents.ToolRegistry()

        @tools.read
        def find_slots(ctx: agents.ToolContext, day: str) -> list[str]:
            """Free slots on a day."""
            self.log.append(("find_slots", day))
            return ["09:00", "10:00"]

        @tools.write(kind="compensable")
        def book_slot(ctx: storno.StepContext, slot: str) -> str:
            """Book a slot."""
            self.keys.append(("book_slot", ctx.idempotency_key))
            if "book_slot" in self.flaky:
                self.flaky.discard("book_slot")
                raise ConnectionError("the booking API reset the connection")
            self.log.append(("book_slot", slot))
            return f"booking-{slot}"

        @book_slot.compensation
        def cancel_slot(ctx: storno.CompensationContext[str], slot: str) -> None:
            self.log.append(("cancel_slot", ctx.result))

        @tools.write(kind="compensable", approval=lambda args: args["amount"] > 500)
        def charge_card(ctx: storno.StepContext, customer: str, amount: int) -> str:
            """Charge the customer's card."""
            self.keys.append(("charge_card", ctx.idempotency_key))
            if self.declined:
                time.sleep(0.2)  # long enough for a write run alongside it to land
                raise storno.TerminalError("card declined")
            self.log.append(("charge_card", amount))
            return f"charge-{customer}-{amount}"

        @charge_card.compensation
        def refund(ctx: storno.CompensationContext[str], customer: str, amount: int) -> None:
            self.log.append(("refund", ctx.result))

        @tools.write(kind="noncompensable")
        def send_sms(ctx: storno.StepContext, to: str, body: str) -> str:
            """Send a text message."""
            self.log.append(("send_sms", body))
            return "sent"

        @tools.write(kind="compensable")
        def add_to_calendar(ctx: storno.StepContext, slot: str) -> str:
            """Put the booking in the calendar."""
            self.log.append(("add_to_calendar", slot))
            return "event-1"

        @add_to_calendar.compensation
        def remove_from_calendar(ctx: storno.CompensationContext[str], slot: str) -> None:
            self.log.append(("remove_from_calendar", slot))
