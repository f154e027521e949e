"""RabbitMQ as storno's broker: a durable topic exchange, a durable queue per consumer.

``pip install 'storno[rabbitmq]'``. A message's routing key is its topic; the queue
``<queue_prefix or exchange>.<consumer>`` is bound to each topic the consumer subscribes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from storno.events._protocol import EventMessage

__all__ = ["RabbitBroker", "RabbitReceived", "RabbitSubscription"]

log = logging.getLogger("storno.events.rabbitmq")

# Headers RabbitMQ itself adds on the way (quorum queues, dead-lettering), not the user's.
_BROKER_HEADERS = frozenset({"x-delivery-count", "x-death"})
_BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")


class RabbitBroker:
    """storno's :class:`~storno.events.Broker` on RabbitMQ (tested on RabbitMQ 3.10).

    Publishing uses publisher confirms on a robust connection (``connect_robust``: it
    reconnects and declares the exchange, queues and bindings again). Messages are persistent,
    with ``message_id`` the event id and ``routing_key`` the topic.

    *Unroutable messages.* By default (``mandatory=False``) an event whose topic no queue is
    bound to yet is confirmed and dropped by RabbitMQ: publish/subscribe as MassTransit and
    Debezium's RabbitMQ sink do it, where producers do not wait for consumers to exist. A
    consumer therefore receives what was published after its first ``subscribe`` (its queue is
    durable from then on, whether it is connected or not). With ``mandatory=True`` such an
    event is an error instead, so the relay keeps it and retries: nothing is lost, but an
    outbox with a topic nobody subscribed to stops draining.

    *Redelivery.* RabbitMQ only says whether a message was delivered before, so
    ``deliveries`` is 1 or 2, exact on quorum queues (``queue_arguments={"x-queue-type":
    "quorum"}``), which count in ``x-delivery-count``. ``nak(delay)`` requeues at once: RabbitMQ
    has no delayed requeue, and sleeping before it would hold the message and the caller.
    ``queue_arguments`` are declared with every queue (a dead-letter exchange, the queue type);
    they must match those of a queue that already exists.
    """

    name = "rabbitmq"

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        exchange: str = "storno",
        publish_timeout: float = 5.0,
        prefetch: int = 100,
        queue_prefix: str | None = None,
        queue_arguments: Mapping[str, Any] | None = None,
        mandatory: bool = False,
        connect_timeout: float = 10.0,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        if publish_timeout <= 0 or connect_timeout <= 0 or prefetch < 1:
            raise ValueError("publish_timeout, connect_timeout and prefetch must be positive")
        self.url = url
        self.exchange = exchange
        self.publish_timeout = publish_timeout
        self.prefetch = prefetch
        self.queue_prefix = queue_prefix
        self.queue_arguments = dict(queue_arguments or {})
        self.mandatory = mandatory
        self.connect_timeout = connect_timeout
        self.connect_options = dict(connect_options or {})
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._subscriptions: set[RabbitSubscription] = set()

    def queue_name(self, consumer: str) -> str:
        """The durable queue of ``consumer``."""
        return f"{self.queue_prefix or self.exchange}.{consumer}"

    async def connect(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            return
        async with asyncio.timeout(self.connect_timeout):
            connection = await aio_pika.connect_robust(self.url, **self.connect_options)
        try:
            async with asyncio.timeout(self.connect_timeout):
                # on_return_raises: an unroutable mandatory message fails its publish.
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                exchange = await self._declare_exchange(channel)
        except BaseException:
            await connection.close()
            raise
        self._connection, self._exchange = connection, exchange

    async def _declare_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        for subscription in list(self._subscriptions):
            await subscription.close()
        if connection is not None:
            await connection.close()

    async def publish(self, messages: Sequence[EventMessage]) -> list[BaseException | None]:
        exchange = self._require()[1]
        return list(await asyncio.gather(*(self._publish_one(exchange, m) for m in messages)))

    async def _publish_one(
        self, exchange: AbstractExchange, message: EventMessage
    ) -> BaseException | None:
        amqp = aio_pika.Message(
            message.payload.encode(),
            headers=dict(message.wire_headers()),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.event_id,
            correlation_id=message.correlation_id,
            timestamp=message.emitted_at or None,
            app_id="storno",
        )
        try:
            # While the connection is down, publish waits for it to come back: bounded here.
            async with asyncio.timeout(self.publish_timeout):
                await exchange.publish(amqp, routing_key=message.topic, mandatory=self.mandatory)
        except TimeoutError:
            return TimeoutError(
                f"event {message.event_id}: not confirmed by RabbitMQ within "
                f"{self.publish_timeout}s"
            )
        except Exception as exc:  # DeliveryError (nacked), PublishError (unroutable), ...
            return exc
        return None

    async def subscribe(self, consumer: str, topics: Sequence[str]) -> RabbitSubscription:
        connection = self._require()[0]
        if isinstance(topics, str) or not topics:
            raise ValueError(f"topics must be a non-empty sequence of topic names: {topics!r}")
        # A channel of its own: closing it hands back every message it holds, acked or not.
        channel = await connection.channel()
        try:
            await channel.set_qos(prefetch_count=self.prefetch)
            exchange = await self._declare_exchange(channel)
            queue = await channel.declare_queue(
                self.queue_name(consumer), durable=True, arguments=self.queue_arguments or None
            )
            for topic in dict.fromkeys(topics):
                await queue.bind(exchange, routing_key=topic)
            subscription = RabbitSubscription(channel, queue, on_close=self._subscriptions.discard)
            await subscription._start()
        except BaseException:
            await channel.close()
            raise
        self._subscriptions.add(subscription)
        return subscription

    def _require(self) -> tuple[AbstractRobustConnection, AbstractExchange]:
        if self._connection is None or self._exchange is None:
            raise RuntimeError("RabbitBroker is not connected: call connect() first")
        return self._connection, self._exchange


class RabbitReceived:
    """A message a :class:`RabbitSubscription` delivered; ``raw`` is aio-pika's own.

    Acking or naking a message whose channel has gone (the connection dropped) does nothing:
    RabbitMQ has already put it back in the queue, and delivers it again.
    """

    __slots__ = ("message", "raw")

    def __init__(self, raw: AbstractIncomingMessage, message: EventMessage) -> None:
        self.raw = raw
        self.message = message

    @property
    def deliveries(self) -> int:
        count = (self.raw.headers or {}).get("x-delivery-count")
        if isinstance(count, int):  # a quorum queue counts earlier deliveries
            return count + 1
        return 2 if self.raw.redelivered else 1

    async def ack(self) -> None:
        try:
            await self.raw.ack()
        except aio_pika.exceptions.ChannelInvalidStateError:
            log.warning("ack of %s after its channel closed: it comes again", self._event())

    async def nak(self, delay: float | None = None) -> None:
        try:
            await self.raw.nack(requeue=True)
        except aio_pika.exceptions.ChannelInvalidStateError:
            log.warning("nak of %s after its channel closed: it comes again", self._event())

    def _event(self) -> str:
        return f"event {self.message.event_id}"


class RabbitSubscription:
    """The messages of one consumer's queue, from a channel of its own.

    A message without storno's headers (something else published to the exchange) is logged
    and rejected without requeueing: it goes to the queue's dead-letter exchange if one is
    configured (``x-dead-letter-exchange``), else RabbitMQ drops it; acking it would count
    it as handled. ``close()`` closes the channel, so RabbitMQ requeues at once every message
    it delivered there and was not acked.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        queue: AbstractQueue,
        *,
        on_close: Callable[[RabbitSubscription], None] | None = None,
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._on_close = on_close
        self._inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._closed = False

    @property
    def queue_name(self) -> str:
        return self._queue.name

    async def _start(self) -> None:
        await self._queue.consume(self._inbox.put)

    def __aiter__(self) -> AsyncIterator[RabbitReceived]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RabbitReceived]:
        while not self._closed:
            raw = await self._inbox.get()
            if raw is None:
                break
            if _channel_gone(raw):  # delivered before a reconnect: RabbitMQ has requeued it
                continue
            received = await self._wrap(raw)
            if received is not None:
                yield received

    async def _wrap(self, raw: AbstractIncomingMessage) -> RabbitReceived | None:
        try:
            message = EventMessage.from_wire(
                _string_headers(raw.headers), raw.body, topic=raw.routing_key
            )
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning(
                "rejected a message on %s that storno cannot read (routing key %r): %s",
                self.queue_name,
                raw.routing_key,
                exc,
            )
            with contextlib.suppress(aio_pika.exceptions.ChannelInvalidStateError):
                await raw.reject(requeue=False)
            return None
        return RabbitReceived(raw, message)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._channel.close()
        self._inbox.put_nowait(None)  # wakes an iterator waiting for the next message
        if self._on_close is not None:
            self._on_close(self)


def _channel_gone(raw: AbstractIncomingMessage) -> bool:
    try:
        return raw.channel.is_closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return True


def _string_headers(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """AMQP's typed header table as the strings storno put there (others: what str() says)."""
    out: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if name in _BROKER_HEADERS or name.startswith(_BROKER_HEADER_PREFIXES):
            continue
        if isinstance(value, bytes):
            out[name] = value.decode(errors="replace")
        elif isinstance(value, str | int | float | bool):
            out[name] = str(value)
    return out
