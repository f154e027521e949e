"""The broker adapters as storno's protocol sees them, type-checked by mypy (strict), never run:
each adapter, its subscriptions and received messages satisfy Broker, Subscription, Received."""

from __future__ import annotations

from typing import assert_type

from storno.events import Broker, EventMessage, Received, Subscription
from storno.events.nats import NatsBroker, NatsReceived, NatsSubscription
from storno.events.rabbitmq import RabbitBroker, RabbitReceived, RabbitSubscription


async def relay(broker: Broker, messages: list[EventMessage]) -> int:
    await broker.connect()
    results = await broker.publish(messages)
    assert_type(results, list[BaseException | None])
    return sum(result is None for result in results)


async def consume(broker: Broker) -> None:
    subscription: Subscription = await broker.subscribe("billing", ["orders"])
    async for received in subscription:
        assert_type(received, Received)
        assert_type(received.deliveries, int)
        await received.nak(delay=1.0) if received.message.key else await received.ack()
    await subscription.close()


async def adapters(nats: NatsBroker, rabbit: RabbitBroker, messages: list[EventMessage]) -> None:
    for broker in (nats, rabbit):
        await relay(broker, messages)
        await consume(broker)
    nats_subscription = await nats.subscribe("billing", ["orders"])
    assert_type(nats_subscription, NatsSubscription)
    async for from_nats in nats_subscription:
        assert_type(from_nats, NatsReceived)
        as_received: Received = from_nats
        await as_received.ack()
    rabbit_subscription: Subscription = await rabbit.subscribe("billing", ["orders"])
    assert isinstance(rabbit_subscription, RabbitSubscription)
    async for from_rabbit in rabbit_subscription:
        assert isinstance(from_rabbit, RabbitReceived)
        await from_rabbit.ack()


def nats_broker() -> Broker:
    return NatsBroker("nats://127.0.0.1:4222", stream="orders", subject_prefix="orders.")


def rabbit_broker() -> Broker:
    return RabbitBroker(exchange="orders", mandatory=True, queue_prefix="svc")
