"""The seeds' sagas, written against a FakeProvider, for the fault-schedule tests.

Booking (seed article 000): book a slot, charge the card, send the confirmation SMS, sync the
calendar. The SMS cannot be unsent, so it is noncompensable and acts as the point of no
return; the calendar sync after it is idempotent and retried until it succeeds.

CRM -> invoice -> Slack (seed article 001): the Slack message is read by a person at once,
so it is noncompensable and comes last.
"""

from __future__ import annotations

from typing import Any

import storno
from storno.testing import FakeProvider

BOOKING_OPERATIONS = {
    "book": "compensable",
    "charge": "compensable",
    "sms": "noncompensable",
    "calendar": "retryable",
}
INVOICING_OPERATIONS = {"crm": "compensable", "invoice": "compensable", "slack": "noncompensable"}


def booking(provider: FakeProvider) -> tuple[storno.Saga[..., Any], list[storno.Step[..., Any]]]:
    """The booking saga of seed 000, as sync steps (each call runs in a worker thread)."""

    @storno.step(
        name="book_slot", verify=lambda ctx, who, slot, amount: provider.lookup(ctx, "book")
    )
    def book_slot(ctx: storno.StepContext, who: str, slot: str, amount: int) -> Any:
        return provider.call(ctx, "book", who=who, slot=slot)

    @book_slot.compensation
    def release_slot(
        ctx: storno.CompensationContext[Any], who: str, slot: str, amount: int
    ) -> None:
        provider.undo(ctx, "release")

    @storno.step(name="charge_card", verify=lambda ctx, who, amount: provider.lookup(ctx, "charge"))
    def charge_card(ctx: storno.StepContext, who: str, amount: int) -> Any:
        return provider.call(ctx, "charge", who=who, amount=amount)

    @charge_card.compensation
    def refund_card(ctx: storno.CompensationContext[Any], who: str, amount: int) -> None:
        provider.undo(ctx, "refund")

    @storno.step(name="send_sms", kind="noncompensable")
    def send_sms(ctx: storno.StepContext, who: str, body: str) -> Any:
        return provider.call(ctx, "sms", who=who, body=body)

    @storno.step(
        name="sync_calendar",
        kind="retryable",
        verify=lambda ctx, who, slot: provider.lookup(ctx, "calendar"),
    )
    def sync_calendar(ctx: storno.StepContext, who: str, slot: str) -> Any:
        return provider.call(ctx, "calendar", who=who, slot=slot)

    @storno.saga(name="booking")
    async def booking_saga(ctx: storno.SagaContext, who: str, slot: str, amount: int) -> str:
        booked = await ctx.step(book_slot, who, slot, amount)
        await ctx.step(charge_card, who, amount)
        await ctx.step(send_sms, who, f"Confirmed: {slot}")
        await ctx.step(sync_calendar, who, slot)
        return str(booked["id"])

    return booking_saga, [book_slot, charge_card, send_sms, sync_calendar]


def invoicing(provider: FakeProvider) -> tuple[storno.Saga[..., Any], list[storno.Step[..., Any]]]:
    """CRM -> invoice -> Slack of seed 001, as async steps."""

    async def crm_lookup(ctx: storno.StepContext, customer: str, amount: int) -> Any:
        return provider.lookup(ctx, "crm")

    @storno.step(name="update_crm", verify=crm_lookup)
    async def update_crm(ctx: storno.StepContext, customer: str, amount: int) -> Any:
        return provider.call(ctx, "crm", customer=customer, stage="invoiced")

    @update_crm.compensation
    async def revert_crm(ctx: storno.CompensationContext[Any], customer: str, amount: int) -> None:
        provider.undo(ctx, "revert")

    @storno.step(name="create_invoice")
    async def create_invoice(ctx: storno.StepContext, customer: str, amount: int) -> Any:
        return provider.call(ctx, "invoice", customer=customer, amount=amount)

    @create_invoice.compensation
    async def void_invoice(
        ctx: storno.CompensationContext[Any], customer: str, amount: int
    ) -> None:
        provider.undo(ctx, "void")

    @storno.step(name="notify_slack", kind="noncompensable")
    async def notify_slack(ctx: storno.StepContext, customer: str, text: str) -> Any:
        return provider.call(ctx, "slack", customer=customer, text=text)

    @storno.saga(name="invoicing")
    async def invoicing_saga(ctx: storno.SagaContext, customer: str, amount: int) -> str:
        await ctx.step(update_crm, customer, amount)
        invoice = await ctx.step(create_invoice, customer, amount)
        await ctx.step(notify_slack, customer, f"Invoice {invoice['id']} sent")
        return str(invoice["id"])

    return invoicing_saga, [update_crm, create_invoice, notify_slack]
