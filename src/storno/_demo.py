"""The booking saga from the seed articles, against small in-process fake services.

An AI agent books a viewing: book a slot, charge the card, send a confirmation SMS, sync the
calendar. Each step has a compensation (release the slot, refund the card, send an apology,
delete the calendar entry). The fakes behave like real providers: each keeps a ledger, and a
request that repeats an idempotency key gets the first answer back instead of a second effect.
The payment provider loses its first response (the charge lands, the answer never arrives), so
the run shows an unknown outcome resolved by reading back, and the ledger one charge, not two.

``storno demo`` runs it; the code doubles as an example of declaring steps and a saga.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import storno

__all__ = ["STEP_NAMES", "DemoResult", "Services", "build_booking", "render_ledgers", "run_demo"]

STEP_NAMES = ("book_slot", "charge_card", "send_sms", "sync_calendar")

# Fast retries, so that the demo ends in a blink; real steps keep the default policy.
FAST = storno.RetryPolicy(initial_interval=0.05, maximum_interval=0.2, maximum_attempts=5)


class Refused(Exception):
    """The provider said no for good (slot taken, card declined)."""


class ResponseLost(Exception):
    """The provider applied the request, but its answer never reached us."""


class FakeService:
    """A provider with a ledger that deduplicates requests by idempotency key."""

    title = "service"
    prefix = "id"

    def __init__(self) -> None:
        self.ledger: list[dict[str, Any]] = []
        self._by_key: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self.refuse: str | None = None  # when set, the next new request is refused with it

    def apply(self, key: str, op: str, detail: str, **fields: Any) -> dict[str, Any]:
        """Record an operation once per key; a repeat returns the first entry unchanged."""
        if key in self._by_key:
            return self._by_key[key]
        if self.refuse is not None:
            raise Refused(self.refuse)
        entry = {"op": op, "id": f"{self.prefix}-{next(self._ids):04d}", "detail": detail}
        entry.update(fields, key=key)
        self.ledger.append(entry)
        self._by_key[key] = entry
        return entry

    def find(self, key: str) -> dict[str, Any] | None:
        """Read back: the entry a request with this key made, if it landed."""
        return self._by_key.get(key)


class SlotCalendar(FakeService):
    title = "slot calendar"
    prefix = "bk"


class PaymentProvider(FakeService):
    title = "payment provider"
    prefix = "ch"

    def __init__(self, lose_responses: int = 1) -> None:
        super().__init__()
        self.lose_responses = lose_responses

    def charge(self, key: str, customer: str, amount_cents: int) -> dict[str, Any]:
        entry = self.apply(key, "charge", f"{customer} {_money(amount_cents)}")
        if self.lose_responses > 0:
            self.lose_responses -= 1
            raise ResponseLost("connection reset before the answer arrived")
        return entry


class SmsGateway(FakeService):
    title = "sms gateway"
    prefix = "sms"


class CalendarApi(FakeService):
    title = "calendar api"
    prefix = "ev"


@dataclass
class Services:
    slots: SlotCalendar = field(default_factory=SlotCalendar)
    payments: PaymentProvider = field(default_factory=PaymentProvider)
    sms: SmsGateway = field(default_factory=SmsGateway)
    calendar: CalendarApi = field(default_factory=CalendarApi)

    def all(self) -> list[FakeService]:
        return [self.slots, self.payments, self.sms, self.calendar]

    def ledgers(self) -> dict[str, list[dict[str, Any]]]:
        return {service.title: list(service.ledger) for service in self.all()}


def _money(cents: int) -> str:
    return f"EUR {cents // 100}.{cents % 100:02d}"


def _undo(service: FakeService, ctx: storno.CompensationContext[Any], op: str, detail: str) -> None:
    """Counter-book the forward step's entry (found by its key when its result is unknown)."""
    original = service.find(ctx.forward_key)
    if original is None:
        return  # the forward call never landed: nothing to undo
    service.apply(ctx.idempotency_key, op, f"{detail} (undoes {original['id']})")


def build_booking(services: Services) -> tuple[storno.Saga[..., Any], list[storno.Step[..., Any]]]:
    """The booking saga and its steps, bound to these fake services."""

    @storno.step(retry=FAST, compensation_retry=FAST)
    async def book_slot(ctx: storno.StepContext, customer: str, slot: str) -> str:
        try:
            entry = services.slots.apply(ctx.idempotency_key, "book", f"{slot} for {customer}")
        except Refused as exc:
            raise storno.TerminalError(f"slot calendar refused: {exc}") from exc
        return str(entry["id"])

    @book_slot.compensation
    async def release_slot(ctx: storno.CompensationContext[str], customer: str, slot: str) -> None:
        _undo(services.slots, ctx, "release", f"{slot} for {customer}")

    @storno.step(retry=FAST, compensation_retry=FAST)
    async def charge_card(ctx: storno.StepContext, customer: str, amount_cents: int) -> str:
        try:
            entry = services.payments.charge(ctx.idempotency_key, customer, amount_cents)
        except Refused as exc:
            raise storno.TerminalError(f"payment provider refused: {exc}") from exc
        except ResponseLost as exc:
            raise storno.OutcomeUnknownError(str(exc)) from exc
        return str(entry["id"])

    @charge_card.verifier
    async def find_charge(ctx: storno.StepContext, customer: str, amount_cents: int) -> Any:
        entry = services.payments.find(ctx.idempotency_key)
        return storno.NOT_APPLIED if entry is None else str(entry["id"])

    @charge_card.compensation
    async def refund_card(
        ctx: storno.CompensationContext[str], customer: str, amount_cents: int
    ) -> None:
        _undo(services.payments, ctx, "refund", f"{customer} {_money(amount_cents)}")

    @storno.step(retry=FAST, compensation_retry=FAST)
    async def send_sms(ctx: storno.StepContext, phone: str, body: str) -> str:
        try:
            entry = services.sms.apply(ctx.idempotency_key, "send", f"{phone}: {body}")
        except Refused as exc:
            raise storno.TerminalError(f"sms gateway refused: {exc}") from exc
        return str(entry["id"])

    @send_sms.compensation
    async def send_apology(ctx: storno.CompensationContext[str], phone: str, body: str) -> None:
        apology = "Sorry, your booking could not be completed; nothing is charged."
        _undo(services.sms, ctx, "send", f"{phone}: {apology}")

    @storno.step(retry=FAST, compensation_retry=FAST)
    async def sync_calendar(ctx: storno.StepContext, booking_id: str, slot: str) -> str:
        try:
            entry = services.calendar.apply(
                ctx.idempotency_key, "create", f"viewing {slot} ({booking_id})"
            )
        except Refused as exc:
            raise storno.TerminalError(f"calendar api refused: {exc}") from exc
        return str(entry["id"])

    @sync_calendar.compensation
    async def delete_calendar_entry(
        ctx: storno.CompensationContext[str], booking_id: str, slot: str
    ) -> None:
        _undo(services.calendar, ctx, "delete", f"viewing {slot} ({booking_id})")

    @storno.saga(name="booking")
    async def booking(
        ctx: storno.SagaContext, customer: str, phone: str, slot: str, amount_cents: int
    ) -> dict[str, str]:
        booking_id = await ctx.step(book_slot, customer, slot)
        charge_id = await ctx.step(charge_card, customer, amount_cents)
        await ctx.step(send_sms, phone, f"Viewing booked for {slot}, {_money(amount_cents)}.")
        event_id = await ctx.step(sync_calendar, booking_id, slot)
        return {"booking": booking_id, "charge": charge_id, "calendar_event": event_id}

    return booking, [book_slot, charge_card, send_sms, sync_calendar]


_REFUSALS = {
    "book_slot": ("slots", "slot 10:00 is already taken"),
    "charge_card": ("payments", "card declined"),
    "send_sms": ("sms", "phone number is not reachable"),
    "sync_calendar": ("calendar", "403 insufficient scope for the calendar"),
}


def render_ledgers(ledgers: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The providers' ledgers as text lines, after the run's timeline in ``storno demo``."""
    lines = ["", "ledgers (what each fake provider recorded; nothing is ever deleted)"]
    for title, entries in ledgers.items():
        lines.append(f"  {title}")
        if not entries:
            lines.append("    (nothing)")
        for entry in entries:
            lines.append(
                f"    {entry['id']:<9}{entry['op']:<8} key {entry['key']:<38}{entry['detail']}"
            )
    return lines


@dataclass
class DemoResult:
    info: storno.RunInfo
    ledgers: dict[str, list[dict[str, Any]]]


async def run_demo(url: str, fail_at: str | None = None) -> DemoResult:
    """Run one booking to its end in this process and return the run and the ledgers."""
    services = Services()
    if fail_at is not None:
        attr, reason = _REFUSALS[fail_at]
        getattr(services, attr).refuse = reason
    booking, steps = build_booking(services)
    async with storno.Storno(url, sagas=[booking], steps=steps) as app:
        async with app.worker(poll_interval=0.05):
            handle = await app.start(booking, "alice", "+15550100", "10:00", 4900)
            # A compensated run is a result too: the caller shows how the run ended.
            with contextlib.suppress(storno.RunFailedError):
                await handle.result(timeout=30)
        info = await app.describe(handle.run_id)
    return DemoResult(info, services.ledgers())
