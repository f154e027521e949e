"""A choreographed booking: three participants react to each other's events, no orchestrator.

    python examples/choreography.py [DATABASE_URL] [--nats nats://127.0.0.1:4222] [--ok]

``slot`` holds a slot when a booking is requested and waits (durably, with a timeout) for the
payment's outcome; ``payment`` authorizes and captures when a slot is held; ``notification``
tells the customer. The card is declined (unless ``--ok``), so ``payment.failed`` makes each
participant undo its own work: payment voids its authorization, slot releases the slot,
notification apologises. Every event carries the booking's correlation id, so the one
timeline shows all three.

The participants are three storno applications on one database, here in one process with
an in-memory broker; with ``--nats`` they talk through NATS JetStream (needs a server, and
``pip install 'storno[nats]'``), as they would in three processes on three machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import uuid
from typing import Any

import storno
import storno.outbox
from storno.events import Broker, EventMessage, MemoryBroker, signal, start

# --- slot -------------------------------------------------------------------------------


@storno.step
async def reserve_slot(ctx: storno.StepContext, booking: dict[str, Any]) -> str:
    print(f"slot: {booking['slot']} held for {booking['id']}")
    return booking["slot"]


@reserve_slot.compensation
async def release_slot(ctx: storno.CompensationContext[str], booking: dict[str, Any]) -> None:
    print(f"slot: {booking['slot']} released")


@storno.saga
async def hold_slot(ctx: storno.SagaContext, booking: dict[str, Any]) -> str:
    slot = await ctx.step(reserve_slot, booking)
    ctx.emit("slot.held", {"booking": booking, "slot": slot}, key=booking["id"])
    outcome = await ctx.wait_for_signal("payment", timeout=3600)  # a durable timer
    if outcome["status"] != "charged":
        raise storno.TerminalError(f"payment failed: {outcome['reason']}")
    return slot


@storno.on("booking.requested")
def slot_for_booking(event: EventMessage) -> Any:
    return start(hold_slot, event.data)


@storno.on("payment.charged", "payment.failed")
def payment_outcome(event: EventMessage) -> Any:
    status = "charged" if event.topic == "payment.charged" else "failed"
    outcome = {"status": status, "reason": event.data.get("reason")}
    return signal("payment", outcome, correlation_id=event.correlation_id, saga=hold_slot)


# --- payment ----------------------------------------------------------------------------


@storno.step
async def authorize(ctx: storno.StepContext, booking: dict[str, Any]) -> str:
    print(f"payment: {booking['amount']} authorized")
    return "auth-1"


@authorize.compensation
async def void(ctx: storno.CompensationContext[str], booking: dict[str, Any]) -> None:
    print(f"payment: authorization {ctx.result} voided")


@storno.step(kind="pivot")
async def capture(ctx: storno.StepContext, booking: dict[str, Any]) -> None:
    if booking["declined"]:
        raise storno.TerminalError("card declined")
    print(f"payment: {booking['amount']} captured")


@storno.saga
async def take_payment(ctx: storno.SagaContext, booking: dict[str, Any]) -> None:
    await ctx.step(authorize, booking)
    try:
        await ctx.step(capture, booking)
    except storno.StepFailedError as exc:
        ctx.emit("payment.failed", {"booking": booking, "reason": exc.error_message})
        raise
    ctx.emit("payment.charged", {"booking": booking})


@storno.on("slot.held")
def payment_for_slot(event: EventMessage) -> Any:
    return start(take_payment, event.data["booking"])


# --- notification -----------------------------------------------------------------------


@storno.step(kind="noncompensable")
async def send_email(ctx: storno.StepContext, booking: dict[str, Any], text: str) -> None:
    print(f"notification: to {booking['email']}: {text}")


@storno.saga
async def tell_customer(ctx: storno.SagaContext, booking: dict[str, Any], text: str) -> None:
    await ctx.step(send_email, booking, text)


@storno.on("payment.charged", "payment.failed", name="customer_mail")
def customer_mail(event: EventMessage) -> Any:
    booked = event.topic == "payment.charged"
    text = "your booking is confirmed" if booked else "sorry, your card was declined"
    return start(tell_customer, event.data["booking"], text)


PARTICIPANTS = {
    "slot": ([hold_slot], [slot_for_booking, payment_outcome]),
    "payment": ([take_payment], [payment_for_slot]),
    "notification": ([tell_customer], [customer_mail]),
}


def make_broker(nats: str | None, run: str) -> Broker:
    if nats is None:
        return MemoryBroker()
    from storno.events.nats import NatsBroker

    return NatsBroker(nats, stream=f"choreography-{run}", subject_prefix=f"choreography.{run}.")


async def main(url: str, nats: str | None, ok: bool) -> None:
    run = uuid.uuid4().hex[:8]
    shared = make_broker(nats, run)
    apps = [
        storno.Storno(url, sagas=sagas, handlers=handlers, broker=shared)
        for sagas, handlers in PARTICIPANTS.values()
    ]
    booking = {"id": f"booking-{run}", "slot": "2026-12-04 10:00", "amount": 650,
               "email": "ada@example.com", "declined": not ok}  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        for app in apps:
            await stack.enter_async_context(app)
            await stack.enter_async_context(app.worker(poll_interval=0.1))
        # The web shop books in its own transaction on the same database (here SQLite).
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            storno.outbox.enqueue(
                conn, "booking.requested", booking, key=booking["id"],
                correlation_id=booking["id"], source="web shop",
            )  # fmt: skip
            conn.commit()
        runs = await wait_for_all(apps[0], booking["id"])
    for record in runs:
        print(f"{record.saga}: {record.status.value}")
    print(f"one timeline: storno correlation {booking['id']}")
    print(f"storno show {runs[0].run_id}")


async def wait_for_all(app: storno.Storno, correlation_id: str) -> list[Any]:
    ended = {storno.RunStatus.COMPLETED, storno.RunStatus.COMPENSATED}
    for _ in range(600):
        runs = await app.store.correlated(correlation_id)
        if len(runs) == 3 and all(r.status in ended for r in runs):
            return runs
        await asyncio.sleep(0.05)
    raise SystemExit(f"the booking did not finish: {runs}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", nargs="?", default="sqlite:///choreography.db")
    parser.add_argument("--nats", help="NATS server URL (default: an in-memory broker)")
    parser.add_argument("--ok", action="store_true", help="the card is not declined")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.nats, args.ok))
