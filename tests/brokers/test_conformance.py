"""What every broker adapter does the same, run on NATS JetStream and on RabbitMQ."""

from __future__ import annotations

import asyncio
import socket

import pytest

from brokers.kit import PUBLISH_TIMEOUT, BrokerKit, event, ids, receive, receive_all
from conftest import wait_for
from storno.events import Broker, EventMessage


async def test_messages_arrive_with_everything_storno_put_on_them(kit: BrokerKit) -> None:
    broker = await kit.broker()
    assert isinstance(broker, Broker)
    subscription = await kit.subscribe(broker, "billing", ["orders"])
    sent = [event(n) for n in range(30)]
    assert await broker.publish(sent) == [None] * len(sent)
    got = await receive(subscription, len(sent))
    # Every field, the user's headers and the JSON payload, compare equal.
    assert {r.message.event_id: r.message for r in got} == {m.event_id: m for m in sent}
    assert {r.deliveries for r in got} == {1}
    assert got[0].message.data == {"order": 0, "lines": [{"sku": "ä-1", "qty": 2}], "paid": None}


async def test_a_keys_messages_published_one_after_another_arrive_in_order(
    kit: BrokerKit,
) -> None:
    broker = await kit.broker()
    subscription = await kit.subscribe(broker, "shipping", ["orders"])
    sent = [event(n, key="order-7") for n in range(15)]
    for message in sent:
        assert await broker.publish([message]) == [None]
    assert ids(await receive(subscription, len(sent))) == [m.event_id for m in sent]


async def test_one_subscription_reads_several_topics(kit: BrokerKit) -> None:
    broker = await kit.broker()
    subscription = await kit.subscribe(broker, "audit", ["orders", "refunds.issued"])
    sent = [event(1), event(2, "refunds.issued"), event(3, "ignored")]
    assert await broker.publish(sent) == [None, None, None]
    got = await receive(subscription, 2)
    assert sorted((r.message.topic, r.message.event_id) for r in got) == [
        ("orders", "run-0/1"),
        ("refunds.issued", "run-0/2"),
    ]


async def test_a_nakked_message_comes_again(kit: BrokerKit) -> None:
    broker = await kit.broker()
    subscription = await kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(1)]) == [None]
    (first,) = await receive(subscription, 1, ack=False)
    assert first.deliveries == 1
    await first.nak()
    (again,) = await receive(subscription, 1)
    assert again.message == first.message and again.deliveries >= 2


async def test_a_message_not_acked_before_the_subscription_closed_comes_again(
    kit: BrokerKit,
) -> None:
    broker = await kit.broker()
    subscription = await kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(1), event(2)]) == [None, None]
    got = await receive(subscription, 2, ack=False)
    await got[0].ack()
    await subscription.close()
    reopened = await kit.subscribe(broker, "billing", ["orders"])
    (again,) = await receive(reopened, 1)
    assert again.message.event_id == got[1].message.event_id and again.deliveries >= 2


async def test_a_durable_consumer_gets_what_was_published_while_it_was_away(
    kit: BrokerKit,
) -> None:
    broker = await kit.broker()
    subscription = await kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(1)]) == [None]
    assert ids(await receive(subscription, 1)) == ["run-0/1"]
    await subscription.close()

    assert await broker.publish([event(2), event(3)]) == [None, None]
    reopened = await kit.subscribe(broker, "billing", ["orders"])
    assert sorted(ids(await receive(reopened, 2))) == ["run-0/2", "run-0/3"]
    # The acknowledged message does not come again: the next one is the one published next.
    assert await broker.publish([event(4)]) == [None]
    assert ids(await receive(reopened, 1)) == ["run-0/4"]


async def test_two_consumers_each_get_every_message(kit: BrokerKit) -> None:
    broker = await kit.broker()
    billing = await kit.subscribe(broker, "billing", ["orders"])
    shipping = await kit.subscribe(broker, "shipping", ["orders"])
    assert await broker.publish([event(1), event(2)]) == [None, None]
    assert sorted(ids(await receive(billing, 2))) == ["run-0/1", "run-0/2"]
    assert sorted(ids(await receive(shipping, 2))) == ["run-0/1", "run-0/2"]


async def test_closing_a_subscription_ends_its_iteration(kit: BrokerKit) -> None:
    broker = await kit.broker()
    subscription = await kit.subscribe(broker, "billing", ["orders"])
    reader = asyncio.create_task(receive(subscription, 1))
    await asyncio.sleep(0.05)  # the reader waits for a message (if not, it ends all the same)
    await subscription.close()
    async with asyncio.timeout(5):
        assert await reader == []


async def test_publish_during_an_outage_fails_in_time_and_the_broker_recovers(
    kit: BrokerKit,
) -> None:
    broker, proxy = await kit.proxied()
    watcher = await kit.broker()  # connected directly: it sees what reached the server
    subscription = await kit.subscribe(watcher, "auditor", ["orders"])
    confirmed = [event(n) for n in range(5)]
    assert await broker.publish(confirmed) == [None] * 5

    await proxy.cut()
    loop = asyncio.get_running_loop()
    started = loop.time()
    during = await broker.publish([event(n) for n in range(5, 10)])
    assert loop.time() - started < PUBLISH_TIMEOUT + 1.0
    assert all(isinstance(result, Exception) for result in during), during

    await proxy.restore()
    # The same object publishes again once its client has reconnected on its own.
    probes = (event(n) for n in range(10, 10_000))

    async def confirms(probe: EventMessage) -> bool:
        if (await broker.publish([probe]))[0] is not None:
            return False
        confirmed.append(probe)
        return True

    await wait_for(lambda: confirms(next(probes)), timeout=15)
    after = [event(n) for n in range(10_000, 10_005)]
    assert await broker.publish(after) == [None] * 5
    confirmed += after

    # Everything confirmed arrives; messages that failed may arrive too (their bytes may have
    # reached the server before the cut, or been resent on reconnecting).
    await receive_all(subscription, {m.event_id for m in confirmed})


async def test_a_subscription_resumes_after_an_outage(kit: BrokerKit) -> None:
    consumer, proxy = await kit.proxied()
    subscription = await kit.subscribe(consumer, "billing", ["orders"])
    publisher = await kit.broker()
    assert await publisher.publish([event(1)]) == [None]
    assert ids(await receive(subscription, 1)) == ["run-0/1"]

    await proxy.cut()
    assert await publisher.publish([event(2)]) == [None]  # stored while the consumer is away
    await proxy.restore()
    assert await publisher.publish([event(3)]) == [None]
    await receive_all(subscription, {"run-0/2", "run-0/3"}, timeout=15)


async def test_connect_to_no_server_fails_within_its_timeout(kit: BrokerKit) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scheme = "nats://" if kit.kind == "nats" else "amqp://guest:guest@"
    broker = kit.make(f"{scheme}127.0.0.1:{port}/", connect_timeout=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises((OSError, TimeoutError)):
        await broker.connect()
    assert loop.time() - started < 3.0


async def test_publish_and_subscribe_before_connect_are_errors(kit: BrokerKit) -> None:
    broker = kit.make()
    with pytest.raises(RuntimeError, match="connect"):
        await broker.publish([event(1)])
    with pytest.raises(RuntimeError, match="connect"):
        await broker.subscribe("billing", ["orders"])


async def test_connect_is_idempotent_and_close_can_be_called_twice(kit: BrokerKit) -> None:
    broker = await kit.broker()
    await broker.connect()
    assert await broker.publish([]) == []
    await broker.close()
    await broker.close()
    await broker.connect()  # and again after a close
    subscription = await kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(1)]) == [None]
    assert ids(await receive(subscription, 1)) == ["run-0/1"]
