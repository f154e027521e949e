"""NATS JetStream only: the stream, deduplication by event id, consumer names, foreign messages
(marked ``nats``: on the shared server), and a private nats-server, killed and started again
under a broker that keeps publishing (needs only the nats-server binary)."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.js import api

from brokers.kit import PUBLISH_TIMEOUT, BrokerKit, event, ids, receive, receive_all
from conftest import wait_for
from storno.events.nats import NatsBroker


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    """A plain nats-py client, to look at what the adapter did."""
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@pytest.mark.nats
async def test_the_same_event_published_twice_is_stored_and_delivered_once(
    nats_kit: BrokerKit, js: nats.js.JetStreamContext
) -> None:
    broker = await nats_kit.broker()
    subscription = await nats_kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(1)]) == [None]
    assert await broker.publish([event(1)]) == [None]  # the relay resending: a duplicate ack
    assert await broker.publish([event(2)]) == [None]
    assert ids(await receive(subscription, 2)) == ["run-0/1", "run-0/2"]
    assert (await js.stream_info(nats_kit.name)).state.messages == 2


@pytest.mark.nats
async def test_connect_creates_the_stream_once_and_leaves_an_existing_one_alone(
    nats_kit: BrokerKit, js: nats.js.JetStreamContext
) -> None:
    broker = await nats_kit.broker(duplicate_window=90.0)
    config = (await js.stream_info(nats_kit.name)).config
    assert config.subjects == [f"{nats_kit.name}.>"]
    assert config.storage == api.StorageType.FILE
    assert config.duplicate_window == 90.0
    await broker.connect()
    other = await nats_kit.broker(duplicate_window=30.0)  # another process, other settings
    assert (await js.stream_info(nats_kit.name)).config.duplicate_window == 90.0
    assert await other.publish([event(1)]) == [None]


@pytest.mark.nats
async def test_without_a_stream_publish_fails_at_once(nats_kit: BrokerKit) -> None:
    broker = await nats_kit.broker(ensure_stream=False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    (result,) = await broker.publish([event(1)])
    assert isinstance(result, nats.js.errors.NoStreamResponseError)
    assert loop.time() - started < PUBLISH_TIMEOUT


@pytest.mark.nats
async def test_consumers_get_valid_distinct_names_and_explicit_acks(
    nats_kit: BrokerKit, js: nats.js.JetStreamContext
) -> None:
    broker = await nats_kit.broker(ack_wait=7.0, max_deliver=4)
    one = broker.consumer_name("a.b", "c")
    two = broker.consumer_name("a", "b.c")
    odd = broker.consumer_name("billing v2 *>", "order.created")
    assert len({one, two, odd}) == 3
    assert not any(c in name for name in (one, two, odd) for c in ". *>")
    assert odd.startswith("billing_v2_order_created_")

    await nats_kit.subscribe(broker, "billing v2 *>", ["order.created"])
    info = await js.consumer_info(nats_kit.name, odd)
    assert info.config.durable_name == odd
    assert info.config.filter_subject == f"{nats_kit.name}.order.created"
    assert info.config.ack_policy == api.AckPolicy.EXPLICIT
    assert (info.config.ack_wait, info.config.max_deliver) == (7.0, 4)


@pytest.mark.nats
async def test_a_message_storno_did_not_send_is_terminated_not_handed_over(
    nats_kit: BrokerKit, js: nats.js.JetStreamContext
) -> None:
    broker = await nats_kit.broker()
    subscription = await nats_kit.subscribe(broker, "billing", ["orders"])
    await js.publish(broker.subject("orders"), b"not storno's", headers={"foo": "bar"})
    assert await broker.publish([event(1)]) == [None]
    assert ids(await receive(subscription, 1)) == ["run-0/1"]
    durable = broker.consumer_name("billing", "orders")

    async def settled() -> bool:
        info = await js.consumer_info(nats_kit.name, durable)
        return info.num_ack_pending == 0 and info.num_redelivered == 0

    await wait_for(settled, timeout=5)


@pytest.mark.nats
async def test_nak_with_a_delay_holds_the_message_back(nats_kit: BrokerKit) -> None:
    broker = await nats_kit.broker()
    subscription = await nats_kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(1)]) == [None]
    (first,) = await receive(subscription, 1, ack=False)
    loop = asyncio.get_running_loop()
    nakked = loop.time()
    await first.nak(delay=0.5)
    (again,) = await receive(subscription, 1)
    assert again.deliveries == 2 and loop.time() - nakked >= 0.45


@pytest.mark.nats
async def test_max_deliver_stops_redelivery(nats_kit: BrokerKit) -> None:
    broker = await nats_kit.broker(max_deliver=2)
    subscription = await nats_kit.subscribe(broker, "billing", ["orders"])
    assert await broker.publish([event(1)]) == [None]
    for delivery in (1, 2):
        (received,) = await receive(subscription, 1, ack=False)
        assert received.deliveries == delivery
        await received.nak()
    assert await broker.publish([event(2)]) == [None]
    assert ids(await receive(subscription, 1)) == ["run-0/2"]


def test_a_subject_prefix_must_end_with_a_dot() -> None:
    with pytest.raises(ValueError, match="subject_prefix"):
        NatsBroker(subject_prefix="storno")
    with pytest.raises(ValueError, match="subject_prefix"):
        NatsBroker(subject_prefix="storno.*.")


# --- a private server, stopped and started again --------------------------------------

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
HAVE_NATS_SERVER = Path(NATS_SERVER).exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateServer:
    """A nats-server of this test's own, with JetStream's files in ``store``."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = _free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        command = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd"]
        self.process = await asyncio.create_subprocess_exec(
            *command, str(self.store), stderr=asyncio.subprocess.DEVNULL
        )

        async def up() -> bool:  # it greets every client with its INFO line once it is ready
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            try:
                return (await asyncio.wait_for(reader.readline(), 2)).startswith(b"INFO")
            finally:
                writer.close()

        await wait_for(up, timeout=10, interval=0.05)

    async def stop(self) -> None:
        """SIGKILL: what was confirmed must be in the store's files already."""
        if self.process is not None:
            self.process.kill()
            await self.process.wait()
            self.process = None


@pytest.fixture
async def private_server(tmp_path: Path) -> AsyncIterator[PrivateServer]:
    if not HAVE_NATS_SERVER:
        pytest.skip(f"no nats-server binary at {NATS_SERVER}")
    server = PrivateServer(tmp_path / "jetstream")
    try:
        yield server
    finally:
        await server.stop()


async def test_a_server_restart_keeps_what_was_confirmed(private_server: PrivateServer) -> None:
    await private_server.start()
    broker = NatsBroker(
        private_server.url,
        publish_timeout=PUBLISH_TIMEOUT,
        connect_options={"reconnect_time_wait": 0.1},
    )
    await broker.connect()
    try:
        assert await broker.publish([event(n) for n in range(5)]) == [None] * 5
        await private_server.stop()
        results = await broker.publish([event(5)])
        assert isinstance(results[0], Exception)

        await private_server.start()
        await wait_for(lambda: _publishes(broker), timeout=15, interval=0.05)
        subscription = await broker.subscribe("billing", ["orders"])
        await receive_all(subscription, {f"run-0/{n}" for n in (0, 1, 2, 3, 4, 6)})
    finally:
        await broker.close()


async def _publishes(broker: NatsBroker) -> bool:
    return (await broker.publish([event(6)]))[0] is None
