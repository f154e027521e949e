"""A small choreography for the tests of the outbox and correlation views.

An order holds a slot and emits ``slot.reserved``; the ``charge`` handler starts a payment run
for it, which emits ``payment.charged``; the ``confirm`` handler signals the order (found by
its correlation id), which emits ``order.done`` and ends. ``make_app`` is what
``storno relay --app events_app:make_app`` loads: its broker is a NATS JetStream broker when
``EVENTS_APP_NATS`` names ``URL STREAM PREFIX`` (and ``storno.events.nats`` exists), else a
``MemoryBroker`` that refuses the topics listed in ``EVENTS_APP_REFUSE`` (a poison event);
``EVENTS_APP_NO_BROKER=1`` leaves the broker out.
"""

from __future__ import annotations

import os
from typing import Any

import storno
from storno._model import RetryPolicy
from storno.events import EventMessage, MemoryBroker

__all__ = ["confirm", "charge", "hold", "make_app", "order", "payment"]

POISON = "poison.topic"


@storno.step(kind="retryable")
async def hold(ctx: storno.StepContext, slot: str) -> str:
    return f"held-{slot}"


@storno.saga
async def order(ctx: storno.SagaContext, slot: str) -> Any:
    held = await ctx.step(hold, slot)
    ctx.emit("slot.reserved", {"slot": slot, "held": held}, key=slot)
    paid = await ctx.wait_for_signal("paid", timeout=120)
    ctx.emit("order.done", {"slot": slot}, key=slot)
    return paid


@storno.saga
async def payment(ctx: storno.SagaContext, slot: str) -> str:
    ctx.emit("payment.charged", {"slot": slot, "amount": 40}, key=slot)
    return "charged"


@storno.on("slot.reserved", name="charge")
def charge(message: EventMessage) -> Any:
    return storno.events.start(payment, message.data["slot"])


@storno.on("payment.charged", name="confirm")
def confirm(message: EventMessage) -> Any:
    return storno.events.signal(
        "paid", message.data, correlation_id=message.correlation_id, saga="order"
    )


def _refusing(topics: set[str]) -> MemoryBroker:
    def refuse(message: EventMessage) -> BaseException | None:
        if message.topic in topics:
            return ValueError(f"the broker refuses {message.topic}")
        return None

    return MemoryBroker(refuse=refuse)


def _broker() -> Any:
    if os.environ.get("EVENTS_APP_NO_BROKER") == "1":
        return None
    nats = os.environ.get("EVENTS_APP_NATS")
    if nats:
        from storno.events.nats import NatsBroker  # type: ignore[import-not-found]

        url, stream, prefix = nats.split()
        return NatsBroker(url, stream=stream, subject_prefix=prefix)
    refused = {t for t in os.environ.get("EVENTS_APP_REFUSE", "").split(",") if t}
    return _refusing(refused | {POISON})


RELAY_OPTIONS = {
    "poll_interval": 0.05,
    "backoff": RetryPolicy(initial_interval=0.01, maximum_interval=0.02, maximum_attempts=2),
}


def make_app(url: str | None = None, broker: Any = "default") -> storno.Storno:
    """The choreography's application (no URL: ``--db`` or ``$STORNO_URL`` decides)."""
    return storno.Storno(
        url,
        sagas=[order, payment],
        broker=_broker() if broker == "default" else broker,
        handlers=[charge, confirm],
        relay_options=RELAY_OPTIONS,
    )
