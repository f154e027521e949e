"""What the broker tests share: a kit per test that names its own stream, exchange and queues,
makes brokers (directly or through a :class:`~proxy.TcpProxy`), and removes it all after."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from proxy import TcpProxy
from storno.events import Broker, EventMessage, Received, Subscription

DEFAULT_PORTS = {"nats": 4222, "rabbitmq": 5672}
PUBLISH_TIMEOUT = 1.0


def event(n: int, topic: str = "orders", *, key: str | None = None, **fields: Any) -> EventMessage:
    """A message with every field storno carries set, so a round trip shows what it loses."""
    values: dict[str, Any] = {
        "event_id": f"run-{n // 100}/{n % 100}",
        "topic": topic,
        "payload": json.dumps({"order": n, "lines": [{"sku": "ä-1", "qty": 2}], "paid": None}),
        "key": key if key is not None else f"order-{n}",
        "correlation_id": f"corr-{n}",
        "causation_id": f"cause-{n}",
        "source": f"run run-{n // 100}",
        "traceparent": f"00-{n:032x}-{n:016x}-01",
        "emitted_at": 1_760_000_000.25 + n,
        "headers": {"tenant": "acme", "x-request": f"req {n}"},
    }
    values.update(fields)
    return EventMessage(**values)


async def receive(
    subscription: Subscription, count: int, *, ack: bool = True, timeout: float = 10.0
) -> list[Received]:
    """The next ``count`` messages (acknowledged unless ``ack=False``); fails after ``timeout``."""
    got: list[Received] = []
    try:
        async with asyncio.timeout(timeout):
            async for received in subscription:
                got.append(received)
                if ack:
                    await received.ack()
                if len(got) == count:
                    break
    except TimeoutError:
        ids = [r.message.event_id for r in got]
        raise AssertionError(f"{len(got)} of {count} messages within {timeout}s: {ids}") from None
    return got


async def receive_all(
    subscription: Subscription, wanted: set[str], *, timeout: float = 10.0
) -> set[str]:
    """Acknowledge messages until every event id in ``wanted`` came; the ids that came."""
    seen: set[str] = set()
    try:
        async with asyncio.timeout(timeout):
            async for received in subscription:
                seen.add(received.message.event_id)
                await received.ack()
                if wanted <= seen:
                    return seen
    except TimeoutError:
        pass
    raise AssertionError(f"missing after {timeout}s: {sorted(wanted - seen)}")


def ids(received: Sequence[Received]) -> list[str]:
    return [r.message.event_id for r in received]


@dataclass
class BrokerKit:
    """One test's brokers of one kind, with names no other test uses."""

    kind: str
    url: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    brokers: list[Any] = field(default_factory=list)
    proxies: list[TcpProxy] = field(default_factory=list)
    consumers: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        """The stream (NATS) or exchange and queue prefix (RabbitMQ) of this test."""
        return f"storno_test_{self.tag}"

    def make(self, url: str | None = None, **options: Any) -> Any:
        """A broker of this kit (not connected yet); ``options`` override the test defaults."""
        url = url or self.url
        if self.kind == "nats":
            from storno.events.nats import NatsBroker

            defaults: dict[str, Any] = {
                "stream": self.name,
                "subject_prefix": f"{self.name}.",
                "publish_timeout": PUBLISH_TIMEOUT,
                "ack_wait": 5.0,
                "connect_options": {"reconnect_time_wait": 0.1, "connect_timeout": 1},
            }
            broker: Any = NatsBroker(url, **{**defaults, **options})
        else:
            from storno.events.rabbitmq import RabbitBroker

            defaults = {
                "exchange": self.name,
                "publish_timeout": PUBLISH_TIMEOUT,
                "connect_options": {"reconnect_interval": 0.1},
            }
            broker = RabbitBroker(url, **{**defaults, **options})
        self.brokers.append(broker)
        return broker

    async def broker(self, **options: Any) -> Any:
        broker = self.make(**options)
        await broker.connect()
        return broker

    async def proxied(self, **options: Any) -> tuple[Any, TcpProxy]:
        """A connected broker whose connection goes through a proxy of its own."""
        parts = urlsplit(self.url)
        proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORTS[self.kind])
        await proxy.__aenter__()
        self.proxies.append(proxy)
        netloc = f"127.0.0.1:{proxy.port}"
        if "@" in parts.netloc:
            netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
        broker = self.make(urlunsplit(parts._replace(netloc=netloc)), **options)
        await broker.connect()
        return broker, proxy

    async def subscribe(self, broker: Broker, consumer: str, topics: Sequence[str]) -> Subscription:
        self.consumers.add(consumer)
        return await broker.subscribe(consumer, topics)

    async def cleanup(self) -> None:
        for broker in self.brokers:
            with contextlib.suppress(Exception):
                await broker.close()
        for proxy in self.proxies:
            await proxy.cut()
        if self.kind == "nats":
            await self._delete_stream()
        else:
            await self._delete_exchange_and_queues()

    async def _delete_stream(self) -> None:
        import nats
        import nats.js.errors

        nc = await nats.connect(self.url)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(self.name)
        finally:
            await nc.close()

    async def _delete_exchange_and_queues(self) -> None:
        import aio_pika

        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            queues = {b.queue_name(c) for b in self.brokers for c in self.consumers}
            for queue in queues:  # deleting a queue that is not there is no error
                await channel.queue_delete(queue)
            for exchange in {b.exchange for b in self.brokers}:
                await channel.exchange_delete(exchange)
        finally:
            await connection.close()
