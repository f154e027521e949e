"""A small choreography for the tests of the outbox and correlation views.

An order holds a slot and emits ``slot.reserved``; the ``charge`` handler starts a payment run
for it, which emits ``payment.charged``; the ``confirm`` handler signals the order (found by
its correlation id), which emits ``order.done`` and ends. ``make_app`` is what
``storno relay --app events_app:make_app`` loads: its broker is a NATS JetStream broker when
``EVENTS_APP_NATS`` names ``URL STREAM PREFIX`` (and ``storno.events.nats`` exists), else a
``MemoryBroker`` that refuses the topics listed in ``EVENTS_APP_REFUSE`` (a poison event);
``EVENTS_APP_NO_BROKER=1`` leaves the broker out.

Also what the tests of the outbox views share: rows enqueued as a service would
(:func:`enqueue`) and dead letters made through the store's own relay operations
(:func:`make_dead`), so that no test waits on a relay's timing to get one.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import storno
import storno.outbox
from storno._model import RetryPolicy
from storno.events import EventMessage, MemoryBroker

__all__ = [
    "RELAY_OPTIONS",
    "charge",
    "confirm",
    "enqueue",
    "hold",
    "make_app",
    "make_dead",
    "order",
    "payment",
]


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
    return _refusing({t for t in os.environ.get("EVENTS_APP_REFUSE", "").split(",") if t})


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


def _schema(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query)).get("schema", "public")


def enqueue(url: str, *events: tuple[str, str, str | None, Any], source: str = "test") -> None:
    """Put ``(event_id, topic, key, payload)`` events into the outbox in one transaction of
    the test's own, as a service sharing the database would."""
    if url.startswith("sqlite"):
        conn: Any = sqlite3.connect(url.removeprefix("sqlite:///"))
    else:
        import psycopg

        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("schema", "pool_size")]
        conn = psycopg.connect(urlunsplit(parts._replace(query=urlencode(query))))
    try:
        for event_id, topic, key, payload in events:
            storno.outbox.enqueue(
                conn, topic, payload, key=key, event_id=event_id, source=source, schema=_schema(url)
            )
        conn.commit()
    finally:
        conn.close()


async def make_dead(store: Any, event_ids: Sequence[str], error: str = "refused: too big") -> None:
    """Make these pending rows dead letters the way a relay does: claimed, then refused
    with no attempt left."""
    now = time.time()
    token = uuid.uuid4().hex
    rows = await store.outbox.claim("test-relay", token, limit=1000, now=now, lease_seconds=30)
    missing = set(event_ids) - {r.message.event_id for r in rows}
    assert not missing, f"not due, so a relay could not refuse them: {missing}"
    for row in rows:
        if row.message.event_id in event_ids:
            status = await store.outbox.failed(token, row.id, error, retry_at=now, max_attempts=1)
            assert status == "dead", status
    await store.outbox.release(token, [r.id for r in rows if r.message.event_id not in event_ids])
