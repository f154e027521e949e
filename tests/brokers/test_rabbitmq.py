"""RabbitMQ only: unroutable events, the queue and its bindings, the AMQP properties, foreign
messages, and exact delivery counts on a quorum queue."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import pytest

from brokers.kit import BrokerKit, event, ids, receive
from conftest import wait_for

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def channel(rabbitmq_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain aio-pika channel, to look at what the adapter did."""
    connection = await aio_pika.connect(rabbitmq_url)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def test_by_default_an_event_no_queue_is_bound_to_is_confirmed_and_dropped(
    rabbitmq_kit: BrokerKit,
) -> None:
    broker = await rabbitmq_kit.broker()
    assert await broker.publish([event(1)]) == [None]  # nobody subscribed to "orders" yet
    subscription = await rabbitmq_kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(2)]) == [None]
    assert ids(await receive(subscription, 1)) == ["run-0/2"]


async def test_with_mandatory_an_unroutable_event_is_an_error_the_relay_retries(
    rabbitmq_kit: BrokerKit,
) -> None:
    broker = await rabbitmq_kit.broker(mandatory=True)
    (result,) = await broker.publish([event(1)])
    assert isinstance(result, aio_pika.exceptions.PublishError)
    subscription = await rabbitmq_kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(1)]) == [None]  # the retry, once a queue is bound
    assert ids(await receive(subscription, 1)) == ["run-0/1"]


async def test_the_queue_is_durable_bound_to_each_topic_and_gets_persistent_messages(
    rabbitmq_kit: BrokerKit, channel: aio_pika.abc.AbstractChannel
) -> None:
    broker = await rabbitmq_kit.broker(queue_prefix=f"{rabbitmq_kit.name}-q")
    assert broker.queue_name("billing") == f"{rabbitmq_kit.name}-q.billing"
    subscription = await rabbitmq_kit.subscribe(broker, "billing", ["orders", "refunds"])
    await subscription.close()  # the queue stays, and fills while nobody reads it
    sent = event(1, correlation_id="corr-x")
    assert await broker.publish([sent, event(2, "refunds"), event(3, "other")]) == [None] * 3

    queue = await channel.declare_queue(broker.queue_name("billing"), passive=True)
    assert queue.declaration_result.message_count == 2
    raw = await queue.get(no_ack=True)
    assert raw is not None
    assert raw.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (raw.message_id, raw.correlation_id) == (sent.event_id, "corr-x")
    assert (raw.routing_key, raw.exchange) == ("orders", rabbitmq_kit.name)
    assert raw.content_type == "application/json"
    assert raw.headers == sent.wire_headers()
    assert raw.body == sent.payload.encode()


async def test_a_message_storno_did_not_send_is_rejected_not_handed_over(
    rabbitmq_kit: BrokerKit, channel: aio_pika.abc.AbstractChannel
) -> None:
    broker = await rabbitmq_kit.broker()
    subscription = await rabbitmq_kit.subscribe(broker, "billing", ["orders"])
    exchange = await channel.get_exchange(rabbitmq_kit.name)
    await exchange.publish(aio_pika.Message(b"not storno's", headers={"foo": 1}), "orders")
    assert await broker.publish([event(1)]) == [None]
    assert ids(await receive(subscription, 1)) == ["run-0/1"]
    await subscription.close()

    async def empty() -> bool:  # rejected without requeueing, and the other one acked
        queue = await channel.declare_queue(broker.queue_name("billing"), passive=True)
        return queue.declaration_result.message_count == 0

    await wait_for(empty, timeout=5)


async def test_a_quorum_queue_counts_every_delivery(rabbitmq_kit: BrokerKit) -> None:
    broker = await rabbitmq_kit.broker(queue_arguments={"x-queue-type": "quorum"})
    subscription = await rabbitmq_kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(1)]) == [None]
    for delivery in (1, 2, 3):
        (received,) = await receive(subscription, 1, ack=False)
        assert received.deliveries == delivery
        assert "x-delivery-count" not in received.message.headers
        if delivery < 3:
            await received.nak()
    await received.ack()


async def test_a_classic_queue_says_only_delivered_before(rabbitmq_kit: BrokerKit) -> None:
    broker = await rabbitmq_kit.broker()
    subscription = await rabbitmq_kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(1)]) == [None]
    for delivery in (1, 2, 2):
        (received,) = await receive(subscription, 1, ack=False)
        assert received.deliveries == delivery
        await received.nak()
