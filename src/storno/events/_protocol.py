"""What storno asks of a message broker: publish with confirmation, consume with explicit acks.

A broker adapter (``storno.events.nats``, ``storno.events.rabbitmq``, or your own) implements
:class:`Broker`. The relay hands it messages to publish and counts a message as sent only once
``publish`` reports it confirmed; the consumer loop reads :class:`Received` messages from a
durable subscription and acknowledges each one after what it did with it is committed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "HEADER_PREFIX",
    "Broker",
    "EventMessage",
    "Received",
    "Subscription",
]

HEADER_PREFIX = "storno-"
"""Headers storno puts on every message; a user's own headers may not start with it."""


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One event as it travels: the outbox row's content, the same on every broker.

    ``event_id`` is stable across every resend (a run's event is ``<run id>/<position>``), so a
    broker that deduplicates by message id (JetStream's ``Nats-Msg-Id``) and a consumer that
    records the ids it handled both drop repeats. ``payload`` is JSON text.
    """

    event_id: str
    topic: str
    payload: str
    key: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    source: str | None = None  # who emitted it: "run <run id>", or the enqueuing service
    traceparent: str | None = None  # W3C trace context of the emitting run, if any
    emitted_at: float = 0.0  # Unix seconds, when it was committed to the outbox
    headers: Mapping[str, str] = field(default_factory=dict)  # the user's own

    @property
    def data(self) -> Any:
        """The payload decoded."""
        return json.loads(self.payload)

    def wire_headers(self) -> dict[str, str]:
        """The message's metadata as string headers (every broker carries these)."""
        out = dict(self.headers)
        out[f"{HEADER_PREFIX}event-id"] = self.event_id
        out[f"{HEADER_PREFIX}topic"] = self.topic
        out[f"{HEADER_PREFIX}emitted-at"] = repr(self.emitted_at)
        for name, value in (
            ("key", self.key),
            ("correlation-id", self.correlation_id),
            ("causation-id", self.causation_id),
            ("source", self.source),
        ):
            if value is not None:
                out[f"{HEADER_PREFIX}{name}"] = value
        if self.traceparent is not None:
            out["traceparent"] = self.traceparent
        return out

    @classmethod
    def from_wire(
        cls, headers: Mapping[str, str], body: bytes, *, topic: str | None = None
    ) -> EventMessage:
        """The message read back from a broker's headers and body (``topic`` if the headers
        lack it: a message published by something other than storno)."""
        p = HEADER_PREFIX
        own = {k: v for k, v in headers.items() if not k.startswith(p) and k != "traceparent"}
        event_id = headers.get(f"{p}event-id")
        if event_id is None:
            raise ValueError("the message has no storno-event-id header: not sent by storno")
        try:
            emitted_at = float(headers.get(f"{p}emitted-at", "0"))
        except ValueError:
            emitted_at = 0.0
        return cls(
            event_id=event_id,
            topic=headers.get(f"{p}topic") or topic or "",
            payload=body.decode(),
            key=headers.get(f"{p}key"),
            correlation_id=headers.get(f"{p}correlation-id"),
            causation_id=headers.get(f"{p}causation-id"),
            source=headers.get(f"{p}source"),
            traceparent=headers.get("traceparent"),
            emitted_at=emitted_at,
            headers=own,
        )


class Received(Protocol):
    """A message a subscription delivered; acknowledged only after its handling committed."""

    @property
    def message(self) -> EventMessage: ...

    @property
    def deliveries(self) -> int:
        """How many times the broker has delivered it (1 the first time), if it says."""

    async def ack(self) -> None:
        """Done with: the broker will not deliver it again to this consumer."""

    async def nak(self, delay: float | None = None) -> None:
        """Not handled: deliver it again (after ``delay`` seconds, if the broker can)."""


class Subscription(Protocol):
    """A durable consumer's stream of messages: ``async for received in subscription``."""

    def __aiter__(self) -> AsyncIterator[Received]: ...

    async def close(self) -> None:
        """Stop receiving; unacknowledged messages are delivered again later."""


@runtime_checkable
class Broker(Protocol):
    """A message broker as storno uses it. Every method is called from one event loop."""

    name: str  # for logs and metrics: "nats", "rabbitmq", "memory"

    async def connect(self) -> None:
        """Connect (and create what publishing needs: a stream, an exchange); idempotent."""

    async def close(self) -> None:
        """Disconnect; waits for nothing the relay has not already been told about."""

    async def publish(self, messages: Sequence[EventMessage]) -> list[BaseException | None]:
        """Publish these messages and wait for the broker to confirm each one.

        Returns one entry per message, in order: ``None`` where the broker confirmed it
        (stored it durably, or recognised it as a repeat of one it stored), else the error.
        No two messages of one call share a key, so an adapter may send them all before it
        waits for any confirmation. It must not wait forever: an unconfirmed message becomes
        an error after the adapter's own timeout.
        """

    async def subscribe(self, consumer: str, topics: Sequence[str]) -> Subscription:
        """A durable subscription named ``consumer`` to these topics (created if missing):
        messages published while it was away are delivered when it is back, and a message not
        acknowledged is delivered again."""
