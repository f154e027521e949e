"""Processes for the event tests: an emitter the crash tests SIGKILL, and the three
participants of a choreographed booking (slot, payment, notification) over NATS JetStream.

    python event_processes_app.py emitter --db URL (--nats URL --prefix P | --rabbitmq URL)
        --stream S --runs N [--crash-at relay.claimed|relay.confirmed]
    python event_processes_app.py participant --role slot|payment|notification --db URL --nats URL
        --stream S --prefix P --ledger PATH

The emitter starts N runs that each emit one event (ids ``e0``..), relays them and exits 0
once the outbox is empty; with ``--crash-at`` it SIGKILLs itself the first time it reaches
that fault point (after writing :data:`MARKER` to stderr). A participant works until SIGTERM;
every effect it applies (and undoes) is a row in the shared ledger file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import sys
from typing import Any

import storno
from storno import _faults
from storno.events import EventMessage, start
from storno.events import signal as signal_runs

MARKER = "EVENTS-APP SIGKILL"
PAYMENT_WAIT = 60.0  # seconds the slot waits for the payment's outcome (a durable timer)


# --- the emitter -----------------------------------------------------------------------


@storno.saga
async def announce(ctx: storno.SagaContext, n: int) -> str:
    return ctx.emit("thing.happened", {"n": n}, key=f"k{n % 5}")


def emitter_broker(args: argparse.Namespace) -> Any:
    if args.rabbitmq:
        from storno.events.rabbitmq import RabbitBroker

        return RabbitBroker(args.rabbitmq, exchange=args.stream)
    from storno.events.nats import NatsBroker

    return NatsBroker(args.nats, stream=args.stream, subject_prefix=args.prefix)


async def emitter(args: argparse.Namespace) -> None:
    if args.crash_at:

        def hook(name: str, details: dict[str, Any]) -> None:
            if name == args.crash_at:
                sys.stderr.write(f"{MARKER} at {name}\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        _faults.set_hook(hook)
    broker = emitter_broker(args)
    async with storno.Storno(args.db, sagas=[announce], broker=broker) as app:
        async with app.worker(relay=False):  # runs first: their rows wait in the outbox
            handles = [
                await app.start(announce.options(run_id=f"e{n}"), n) for n in range(args.runs)
            ]
            for handle in handles:
                await handle.result(timeout=30)
        async with app.worker() as worker:
            relay = worker.relay
            assert relay is not None
            while (await app.store.outbox.stats()).pending:
                if not await relay.relay_once():
                    await asyncio.sleep(0.05)


# --- the choreographed booking ------------------------------------------------------------


def ledger(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, participant TEXT, what TEXT,"
        " booking TEXT)"
    )
    return conn


def apply(path: str, key: str, participant: str, what: str, booking: str) -> None:
    """One effect, once per key (an idempotent provider)."""
    conn = ledger(path)
    try:
        conn.execute(
            "INSERT OR IGNORE INTO effects VALUES (?, ?, ?, ?)", (key, participant, what, booking)
        )
    finally:
        conn.close()


LEDGER = os.environ.get("EVENTS_APP_LEDGER", "")


@storno.step
async def reserve_slot(ctx: storno.StepContext, booking: dict[str, Any]) -> str:
    apply(LEDGER, ctx.idempotency_key, "slot", "reserve", booking["id"])
    return f"slot-{booking['slot']}"


@reserve_slot.compensation
async def release_slot(ctx: storno.CompensationContext[str], booking: dict[str, Any]) -> None:
    apply(LEDGER, ctx.idempotency_key, "slot", "release", booking["id"])


@storno.saga
async def hold_slot(ctx: storno.SagaContext, booking: dict[str, Any]) -> str:
    slot = await ctx.step(reserve_slot, booking)
    ctx.emit("slot.held", {"booking": booking, "slot": slot}, key=booking["id"])
    outcome = await ctx.wait_for_signal("payment", timeout=PAYMENT_WAIT)
    if outcome["status"] != "charged":
        raise storno.TerminalError(f"payment {outcome['status']}: {outcome.get('reason')}")
    return slot


@storno.step
async def authorize(ctx: storno.StepContext, booking: dict[str, Any]) -> str:
    apply(LEDGER, ctx.idempotency_key, "payment", "authorize", booking["id"])
    return "auth-1"


@authorize.compensation
async def void(ctx: storno.CompensationContext[str], booking: dict[str, Any]) -> None:
    apply(LEDGER, ctx.idempotency_key, "payment", "void", booking["id"])


@storno.step(kind="pivot")
async def capture(ctx: storno.StepContext, booking: dict[str, Any]) -> str:
    if booking.get("fail_at") == "payment":
        raise storno.TerminalError("card declined")
    apply(LEDGER, ctx.idempotency_key, "payment", "capture", booking["id"])
    return "captured"


@storno.saga
async def take_payment(ctx: storno.SagaContext, booking: dict[str, Any]) -> str:
    await ctx.step(authorize, booking)
    try:
        await ctx.step(capture, booking)
    except storno.StepFailedError as exc:
        ctx.emit(
            "payment.failed", {"booking": booking, "reason": exc.error_message}, key=booking["id"]
        )
        raise
    ctx.emit("payment.charged", {"booking": booking}, key=booking["id"])
    return "charged"


@storno.step(kind="noncompensable")
async def send_message(ctx: storno.StepContext, booking: dict[str, Any], text: str) -> None:
    apply(LEDGER, ctx.idempotency_key, "notification", text, booking["id"])


@storno.saga
async def notify(ctx: storno.SagaContext, booking: dict[str, Any], text: str) -> None:
    await ctx.step(send_message, booking, text)


@storno.on("booking.requested")
def slot_for_booking(event: EventMessage) -> Any:
    return start(hold_slot, event.data)


@storno.on("payment.charged", "payment.failed")
def payment_outcome(event: EventMessage) -> Any:
    status = "charged" if event.topic == "payment.charged" else "failed"
    data = {"status": status, "reason": event.data.get("reason")}
    return signal_runs("payment", data, correlation_id=event.correlation_id, saga=hold_slot)


@storno.on("slot.held")
def payment_for_slot(event: EventMessage) -> Any:
    return start(take_payment, event.data["booking"])


@storno.on("payment.charged", "payment.failed", name="tell_customer")
def tell_customer(event: EventMessage) -> Any:
    text = "confirmed" if event.topic == "payment.charged" else "sorry"
    return start(notify, event.data["booking"], text)


ROLES: dict[str, tuple[list[Any], list[Any]]] = {
    "slot": ([hold_slot], [slot_for_booking, payment_outcome]),
    "payment": ([take_payment], [payment_for_slot]),
    "notification": ([notify], [tell_customer]),
}


async def participant(args: argparse.Namespace) -> None:
    from storno.events.nats import NatsBroker

    sagas, handlers = ROLES[args.role]
    broker = NatsBroker(args.nats, stream=args.stream, subject_prefix=args.prefix)
    app = storno.Storno(args.db, sagas=sagas, broker=broker, handlers=handlers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with app, app.worker(poll_interval=0.1):
        print(f"{args.role} ready", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["emitter", "participant"])
    parser.add_argument("--db", required=True)
    parser.add_argument("--nats")
    parser.add_argument("--rabbitmq", help="the emitter's broker is RabbitMQ (--stream: exchange)")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--prefix", default="")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--crash-at", choices=["relay.claimed", "relay.confirmed"])
    parser.add_argument("--role", choices=sorted(ROLES))
    parser.add_argument("--ledger")
    args = parser.parse_args()
    if args.ledger:
        global LEDGER
        LEDGER = args.ledger
    asyncio.run(emitter(args) if args.what == "emitter" else participant(args))


if __name__ == "__main__":
    main()
