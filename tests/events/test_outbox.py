"""The transactional outbox on SQLite and PostgreSQL, relayed through a real NATS JetStream."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter, defaultdict
from typing import Any

import pytest

import storno
import storno.outbox
from outbox_support import nats_stream, raw_insert, sqlite_path, stream_messages, wait_until
from storno._model import RetryPolicy
from storno._store import open_store
from storno.events import MemoryBroker, Relay

pytestmark = pytest.mark.nats


@storno.step(kind="retryable")
async def reserve(ctx: storno.StepContext, slot: str) -> str:
    return f"held-{slot}"


@storno.saga
async def book(ctx: storno.SagaContext, slot: str) -> str:
    held = await ctx.step(reserve, slot)
    event_id = ctx.emit("slot.reserved", {"slot": slot, "held": held}, key=slot)
    go = await ctx.wait_for_signal("go")  # suspends: the body replays from the top after it
    ctx.emit("slot.confirmed", {"slot": slot, "go": go}, key=slot)
    return event_id


class CountingNats:
    """A real NatsBroker that also counts what it was asked to publish, per event id."""

    def __init__(self, url: str, stream: str, prefix: str) -> None:
        from storno.events.nats import NatsBroker

        self.inner = NatsBroker(url, stream=stream, subject_prefix=prefix, publish_timeout=2.0)
        self.name = "nats"
        self.sends: Counter[str] = Counter()

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, messages: Any) -> list[BaseException | None]:
        results = await self.inner.publish(messages)
        for message, error in zip(messages, results, strict=True):
            if error is None:
                self.sends[message.event_id] += 1
        return results

    async def subscribe(self, consumer: str, topics: Any) -> Any:
        return await self.inner.subscribe(consumer, topics)


async def test_an_emitted_event_is_sent_once_and_a_replay_emits_nothing(db_url: str) -> None:
    async with nats_stream() as (url, stream, prefix):
        broker = CountingNats(url, stream, prefix)
        async with storno.Storno(db_url, sagas=[book], broker=broker) as app, app.worker():
            handle = await app.start(book, "A1")
            await wait_until(lambda: len(broker.sends) == 1, what="the first event sent")
            await app.signal(handle.run_id, "go", "yes")
            first_id = await handle.result(timeout=10)
            await wait_until(lambda: len(broker.sends) == 2, what="the second event sent")
            rows = await app.store.outbox.rows()
        assert first_id == f"{handle.run_id}/1"
        assert sorted(r.status for r in rows) == ["sent", "sent"]
        assert set(broker.sends.values()) == {1}
        messages = await stream_messages(url, stream)
        assert [m["data"] for m in messages] == [
            {"slot": "A1", "held": "held-A1"},
            {"slot": "A1", "go": "yes"},
        ]
        headers = messages[0]["headers"]
        assert headers["Nats-Msg-Id"] == first_id
        assert headers["storno-correlation-id"] == handle.run_id
        assert headers["storno-source"] == f"run {handle.run_id}"
        assert headers["storno-key"] == "A1"
        assert headers["traceparent"].startswith("00-")


async def test_an_event_is_committed_with_the_run_or_not_at_all(db_url: str) -> None:
    # With no relay, the outbox row is there exactly when the emitting step's commit is.
    broker = MemoryBroker()
    async with storno.Storno(db_url, sagas=[book], broker=broker) as app:
        async with app.worker(relay=False):
            handle = await app.start(book, "B2")
            await wait_until(
                lambda: _status(app, handle.run_id, storno.RunStatus.WAITING), what="waiting"
            )
        rows = await app.store.outbox.rows()
        history = await app.store.history(handle.run_id)
    emitted = [e for e in history if e.type.value == "event_emitted"]
    assert [r.message.event_id for r in rows] == [e.data["event_id"] for e in emitted]
    assert [r.status for r in rows] == ["pending"]
    assert broker.published == []


@storno.saga
async def announce(ctx: storno.SagaContext) -> str:
    return ctx.emit("thing.happened", {"ok": True})


async def test_a_run_started_here_emits_under_its_correlation_id(db_url: str) -> None:
    broker = MemoryBroker()
    async with storno.Storno(db_url, sagas=[announce], broker=broker) as app, app.worker():
        tied = await app.start(announce.options(correlation_id="order-7"))
        alone = await app.start(announce)
        await tied.result(timeout=10)
        await alone.result(timeout=10)
        await wait_until(lambda: len(broker.published) == 2, what="both sent")
        runs = await app.store.correlated("order-7")
    by_run = {m.source: m.correlation_id for m in broker.published}
    assert by_run == {f"run {tied.run_id}": "order-7", f"run {alone.run_id}": alone.run_id}
    assert [r.run_id for r in runs] == [tied.run_id]


async def _status(app: storno.Storno, run_id: str, status: storno.RunStatus) -> bool:
    return (await app.describe(run_id)).status is status


def _connect(db_url: str) -> Any:
    if db_url.startswith("sqlite"):
        return sqlite3.connect(sqlite_path(db_url))
    import psycopg

    from conftest import _libpq

    return psycopg.connect(_libpq(db_url))


def _schema(db_url: str) -> str:
    return db_url.rsplit("schema=", 1)[1].split("&")[0] if "schema=" in db_url else "public"


async def test_enqueue_in_the_users_transaction_sends_on_commit_only(db_url: str) -> None:
    async with nats_stream() as (url, stream, prefix):
        broker = CountingNats(url, stream, prefix)
        async with storno.Storno(db_url, broker=broker) as app:
            conn = _connect(db_url)
            schema = _schema(db_url)
            try:
                orders = "orders" if db_url.startswith("sqlite") else f'"{schema}".orders'
                conn.execute(f"CREATE TABLE {orders} (id TEXT PRIMARY KEY, state TEXT)")
                conn.commit()
                conn.execute(f"INSERT INTO {orders} VALUES ('o-1', 'paid')")
                storno.outbox.enqueue(
                    conn,
                    "order.paid",
                    {"order": "o-1"},
                    key="o-1",
                    event_id="o-1/paid",
                    schema=schema,
                )
                conn.rollback()  # neither the order nor its event
                conn.execute(f"INSERT INTO {orders} VALUES ('o-2', 'paid')")
                storno.outbox.enqueue(
                    conn,
                    "order.paid",
                    {"order": "o-2"},
                    key="o-2",
                    event_id="o-2/paid",
                    schema=schema,
                    source="orders-service",
                )
                conn.commit()
            finally:
                conn.close()
            async with Relay(app.store, broker, poll_interval=0.2):
                await wait_until(lambda: "o-2/paid" in broker.sends, what="o-2/paid sent")
                await asyncio.sleep(0.3)  # a rolled-back event would have gone in the same batch
        assert dict(broker.sends) == {"o-2/paid": 1}
        [message] = await stream_messages(url, stream)
        assert message["headers"]["storno-source"] == "orders-service"


async def test_enqueue_without_the_outbox_table_names_the_fix(tmp_path: Any) -> None:
    conn = sqlite3.connect(tmp_path / "plain.db")
    with pytest.raises(storno.ConfigurationError, match="storno db upgrade"):
        storno.outbox.enqueue(conn, "order.paid", {})
    with pytest.raises(storno.ConfigurationError, match="topic"):
        storno.outbox.enqueue(conn, "order.*", {})
    with pytest.raises(storno.ConfigurationError, match="reserved"):
        storno.outbox.enqueue(conn, "order.paid", {}, headers={"Nats-Msg-Id": "x"})
    conn.close()


@pytest.mark.postgres
async def test_two_transactions_committing_out_of_order_skip_no_row(pg_schema: str) -> None:
    import psycopg

    from conftest import _libpq

    broker = MemoryBroker()
    schema = _schema(pg_schema)
    async with storno.Storno(pg_schema, broker=broker) as app:
        async with Relay(app.store, broker, poll_interval=0.2):
            early = psycopg.connect(_libpq(pg_schema))
            late = psycopg.connect(_libpq(pg_schema))
            try:
                # `early` takes the lower id but commits last.
                storno.outbox.enqueue(early, "t.x", 1, event_id="low", schema=schema)
                storno.outbox.enqueue(late, "t.x", 2, event_id="high", schema=schema)
                late.commit()
                await wait_until(lambda: len(broker.published) == 1, what="the higher id sent")
                early.commit()
                await wait_until(lambda: len(broker.published) == 2, what="the lower id sent")
            finally:
                early.close()
                late.close()
        rows = {r.message.event_id: r for r in await app.store.outbox.rows()}
    assert rows["low"].id < rows["high"].id
    assert [m.event_id for m in broker.published] == ["high", "low"]


async def test_four_relays_keep_order_per_key_and_send_each_event_once(db_url: str) -> None:
    keys, per_key = 50, 8
    async with nats_stream() as (url, stream, prefix):
        brokers = [CountingNats(url, stream, prefix) for _ in range(4)]
        stores = [open_store(db_url) for _ in range(4)]
        conn = _connect(db_url)
        try:
            async with storno.Storno(db_url):  # creates the schema
                pass
            for n in range(per_key):
                for k in range(keys):
                    storno.outbox.enqueue(
                        conn,
                        "seq.next",
                        {"key": k, "n": n},
                        key=f"k{k}",
                        event_id=f"k{k}-{n}",
                        schema=_schema(db_url),
                    )
            conn.commit()
        finally:
            conn.close()
        relays = [
            Relay(s, b, batch_size=37, poll_interval=0.05)
            for s, b in zip(stores, brokers, strict=True)
        ]
        for relay in relays:
            await relay.start()
        try:
            total = keys * per_key
            await wait_until(
                lambda: sum(len(b.sends) for b in brokers) >= total, timeout=60, what="all sent"
            )
        finally:
            for relay in relays:
                await relay.stop()
            for s in stores:
                await s.close()
        sends: Counter[str] = Counter()
        for b in brokers:
            sends.update(b.sends)
        assert len(sends) == keys * per_key and set(sends.values()) == {1}
        assert sum(1 for b in brokers if b.sends) >= 2, "the relays did not share the work"
        seen: dict[int, list[int]] = defaultdict(list)
        for message in await stream_messages(url, stream):
            seen[message["data"]["key"]].append(message["data"]["n"])
        assert all(seen[k] == list(range(per_key)) for k in range(keys)), seen


async def test_a_poison_row_blocks_only_its_own_key(db_url: str) -> None:
    async with nats_stream(max_msg_size=4096) as (url, stream, prefix):
        broker = CountingNats(url, stream, prefix)
        backoff = RetryPolicy(initial_interval=0.05, maximum_interval=0.1, maximum_attempts=3)
        async with storno.Storno(db_url, broker=broker) as app:
            conn = _connect(db_url)
            schema = _schema(db_url)
            try:
                storno.outbox.enqueue(
                    conn, "t.big", "x" * 10_000, key="bad", event_id="bad-1", schema=schema
                )
                storno.outbox.enqueue(conn, "t.ok", 1, key="bad", event_id="bad-2", schema=schema)
                for i in range(5):
                    storno.outbox.enqueue(
                        conn, "t.ok", i, key="good", event_id=f"good-{i}", schema=schema
                    )
                conn.commit()
            finally:
                conn.close()
            async with Relay(app.store, broker, poll_interval=0.05, backoff=backoff) as relay:
                await wait_until(lambda: relay.counts.dead == 1, what="the poison row dead")
                await wait_until(lambda: len(broker.sends) == 5, what="the good key sent")
            stats = await app.store.outbox.stats()
            rows = {r.message.event_id: r for r in await app.store.outbox.rows()}
            assert rows["bad-1"].status == "dead" and rows["bad-1"].attempts == 3
            assert "takes at most 4096" in (rows["bad-1"].last_error or "")
            assert rows["bad-2"].status == "pending"  # waits behind its key's dead letter
            assert stats.dead == 1 and stats.pending == 1
            # An operator gives the dead letter up: its key moves on.
            assert await app.store.outbox.discard(["bad-1"], now=0.0) == 1
            async with Relay(app.store, broker, poll_interval=0.05):
                await wait_until(lambda: "bad-2" in broker.sends, what="the key's next row sent")
        assert "bad-1" not in broker.sends


async def test_polling_finds_a_row_whose_notification_was_lost(db_url: str) -> None:
    async with nats_stream() as (url, stream, prefix):
        broker = CountingNats(url, stream, prefix)
        async with (
            storno.Storno(db_url, broker=broker) as app,
            Relay(app.store, broker, poll_interval=0.3) as relay,
        ):
            await relay.relay_once()  # idle now: only a wake-up or the next poll claims
            raw_insert(db_url, "quiet-1", "t.quiet", None, {"n": 1})
            await wait_until(lambda: "quiet-1" in broker.sends, timeout=5, what="polled")


async def test_a_broker_outage_loses_nothing_and_the_backlog_drains(db_url: str) -> None:
    from proxy import TcpProxy
    from storno.events.nats import NatsBroker

    async with nats_stream() as (url, stream, prefix):
        host, port = url.removeprefix("nats://").split(":")
        async with TcpProxy(host, int(port)) as proxy:
            broker = NatsBroker(
                f"nats://127.0.0.1:{proxy.port}",
                stream=stream,
                subject_prefix=prefix,
                publish_timeout=1.0,
            )
            async with storno.Storno(db_url, sagas=[book], broker=broker) as app, app.worker():
                handles = [await app.start(book, f"s{i}") for i in range(10)]
                await wait_until(
                    lambda: _count(url, stream, 10), what="the first ten events", timeout=20
                )
                await proxy.cut()
                for h in handles:
                    await app.signal(h.run_id, "go", "during the outage")
                for h in handles:
                    await h.result(timeout=20)
                await asyncio.sleep(3)  # several seconds without the broker
                pending = (await app.store.outbox.stats()).pending
                await proxy.restore()
                await wait_until(lambda: _drained(app), what="the backlog drained", timeout=40)
                stats = await app.store.outbox.stats()
        assert pending == 10
        assert stats.pending == 0 and stats.dead == 0
        data = [m["data"] for m in await stream_messages(url, stream)]
        assert len(data) == 20  # resends of what the outage left unconfirmed were dropped
        assert sum(1 for d in data if d.get("go") == "during the outage") == 10


async def _drained(app: storno.Storno) -> bool:
    return (await app.store.outbox.stats()).pending == 0


async def _count(url: str, stream: str, n: int) -> bool:
    return len(await stream_messages(url, stream)) >= n


@storno.saga
def announce_sync(ctx: storno.SyncSagaContext, topic: str) -> str:
    return ctx.emit(topic, {"sync": True}, headers={"x-tenant": "acme"})


async def test_a_sync_saga_emits_and_bad_topics_or_headers_are_refused(db_url: str) -> None:
    broker = MemoryBroker()
    async with storno.Storno(db_url, sagas=[announce_sync], broker=broker) as app, app.worker():
        good = await app.start(announce_sync, "plain.sync")
        assert await good.result(timeout=10) == f"{good.run_id}/0"
        bad = await app.start(announce_sync, "no spaces allowed")
        with pytest.raises(storno.RunFailedError, match="is not dot-separated words"):
            await bad.result(timeout=10)
        await wait_until(lambda: len(broker.published) == 1, what="the good event sent")
    [message] = broker.published
    assert message.headers == {"x-tenant": "acme"} and message.data == {"sync": True}


@storno.saga
async def noted(ctx: storno.SagaContext, value: float) -> float:
    return value


async def test_a_repeat_a_handler_answers_differently_is_dropped_not_retried(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import time as clock

    from storno.events import start

    calls: list[str] = []

    @storno.on("t.moment", name="moments")
    def moment(event: storno.EventMessage) -> Any:
        calls.append(event.event_id)
        return start(noted, clock.time())  # not deterministic: a repeat asks for other input

    broker = MemoryBroker()
    app = storno.Storno(db_url, sagas=[noted], handlers=[moment], broker=broker)
    async with app, app.worker(relay=False):
        message = storno.EventMessage("m-1", "t.moment", "null")
        await broker.publish([message])
        await wait_until(lambda: len(calls) == 1, what="the first delivery")
        with caplog.at_level("INFO", logger="storno.handlers"):
            await broker.redeliver(message, "moments")
            await wait_until(lambda: "handled before" in caplog.text, what="the repeat dropped")
        runs = await app.list_runs(saga="noted")
    assert "failed on event" not in caplog.text  # not handed back for another delivery
    assert len(calls) == 2 and [r.run_id for r in runs] == ["m-1@moments"]
