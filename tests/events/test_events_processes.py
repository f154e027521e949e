"""Events across real processes: SIGKILL around the relay's send, and a choreographed booking
of three participant processes over NATS JetStream."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import storno
import storno.outbox
from event_processes_app import MARKER
from outbox_support import nats_stream, stream_messages, wait_until

APP = Path(__file__).with_name("event_processes_app.py")
pytestmark = [pytest.mark.slow, pytest.mark.nats]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    here = str(Path(__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def _emitter(db_url: str, url: str, stream: str, prefix: str, *extra: str) -> Any:
    nats = ["--nats", url, "--prefix", prefix] if url else []
    return subprocess.run(
        [sys.executable, str(APP), "emitter", "--db", db_url, *nats, "--stream", stream,
         "--runs", "10", *extra],
        env=_env(), capture_output=True, text=True, timeout=90,
    )  # fmt: skip


@pytest.mark.parametrize("crash_at", ["relay.claimed", "relay.confirmed"])
async def test_a_relay_killed_around_its_send_loses_and_doubles_nothing(
    db_url: str, crash_at: str
) -> None:
    async with nats_stream() as (url, stream, prefix):
        killed = await asyncio.to_thread(
            _emitter, db_url, url, stream, prefix, "--crash-at", crash_at
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert MARKER in killed.stderr
        before = await stream_messages(url, stream)
        if crash_at == "relay.claimed":
            assert before == []  # committed, claimed, never sent
        else:
            assert before  # the broker has them; the outbox still calls them unsent
        async with storno.Storno(db_url) as app:
            stats = await app.store.outbox.stats()
        assert stats.pending == 10
        # The claims the dead relay held expire (30 s leases); make that now for the restart.
        _expire_claims(db_url)
        again = await asyncio.to_thread(_emitter, db_url, url, stream, prefix)
        assert again.returncode == 0, again.stderr
        messages = await stream_messages(url, stream)
        ids = [m["headers"]["Nats-Msg-Id"] for m in messages]
        assert sorted(ids) == sorted(f"e{n}/0" for n in range(10))  # each once
        async with storno.Storno(db_url) as app:
            rows = await app.store.outbox.rows()
        assert {r.status for r in rows} == {"sent"}
        if crash_at == "relay.confirmed":
            assert all(r.attempts == 1 for r in rows)


@storno.saga
async def took_note(ctx: storno.SagaContext, n: int) -> int:
    return n


@pytest.mark.rabbitmq
async def test_a_resend_after_a_confirmed_send_has_its_effect_once(
    db_url: str, tmp_path: Path
) -> None:
    # RabbitMQ keeps both copies (it drops no repeats): the consumer's ids must.
    from conftest import broker_url
    from storno.events import EventMessage, start
    from storno.events.rabbitmq import RabbitBroker

    url = broker_url("rabbitmq")
    exchange = f"t{uuid.uuid4().hex[:12]}"
    deliveries: list[str] = []

    @storno.on("thing.happened", name="note_taker")
    def note(event: EventMessage) -> Any:
        deliveries.append(event.event_id)
        return start(took_note, event.data["n"])

    broker = RabbitBroker(url, exchange=exchange)
    consumer_db = f"sqlite:///{tmp_path / 'consumer.db'}"
    app = storno.Storno(consumer_db, sagas=[took_note], handlers=[note], broker=broker)
    try:
        async with app, app.worker(relay=False):
            # The queue is bound before anything is published (RabbitMQ drops unroutable events).
            await wait_until(lambda: _queue_exists(url, broker.queue_name("note_taker")))
            killed = await asyncio.to_thread(
                _emitter, db_url, "", exchange, "", "--rabbitmq", url, "--crash-at",
                "relay.confirmed",
            )  # fmt: skip
            assert killed.returncode == -signal.SIGKILL, killed.stderr
            _expire_claims(db_url)
            again = await asyncio.to_thread(_emitter, db_url, "", exchange, "", "--rabbitmq", url)
            assert again.returncode == 0, again.stderr
            await wait_until(lambda: _ended(app, 10), what="ten runs", timeout=30)
            await wait_until(lambda: len(deliveries) > 10, what="the resends delivered")
            runs = await app.list_runs(saga="took_note")
    finally:
        await _drop_rabbit(url, exchange, broker.queue_name("note_taker"))
    assert sorted(r.run_id for r in runs) == sorted(f"e{n}/0@note_taker" for n in range(10))
    assert len(set(deliveries)) == 10 < len(deliveries)


async def _ended(app: storno.Storno, n: int) -> bool:
    return await app.count_runs(saga="took_note", status=storno.RunStatus.COMPLETED) >= n


async def _queue_exists(url: str, queue: str) -> bool:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, passive=True)
        return True
    except aio_pika.exceptions.ChannelClosed:
        return False
    finally:
        await connection.close()


async def _drop_rabbit(url: str, exchange: str, queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def _expire_claims(db_url: str) -> None:
    sql = "UPDATE {t} SET lease_expires_at = 0 WHERE token IS NOT NULL"
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            conn.execute(sql.format(t="storno_outbox"))
        return
    from conftest import pg_execute

    schema = db_url.rsplit("schema=", 1)[1]
    pg_execute(db_url, sql.format(t=f'"{schema}".storno_outbox'))


def _participant(role: str, db_url: str, url: str, stream: str, prefix: str, ledger: Path) -> Any:
    return subprocess.Popen(
        [sys.executable, str(APP), "participant", "--role", role, "--db", db_url, "--nats", url,
         "--stream", stream, "--prefix", prefix, "--ledger", str(ledger)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _effects(ledger: Path) -> list[tuple[str, str]]:
    if not ledger.exists():
        return []
    with sqlite3.connect(ledger) as conn:
        try:
            return sorted(conn.execute("SELECT participant, what FROM effects"))
        except sqlite3.OperationalError:
            return []


async def test_a_choreographed_booking_compensates_each_participant(
    db_url: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.db"
    async with nats_stream() as (url, stream, prefix):
        async with storno.Storno(db_url):  # the shared database, created once
            pass
        procs = {
            role: _participant(role, db_url, url, stream, prefix, ledger)
            for role in ("slot", "payment", "notification")
        }
        try:
            for role, proc in procs.items():
                line = await asyncio.to_thread(proc.stdout.readline)
                assert line.strip() == f"{role} ready", proc.stderr.read() if proc.poll() else line
            # The web application books in its own transaction, on the same database.
            _enqueue_booking(db_url, {"id": "b-1", "slot": "A7", "fail_at": "payment"})
            expected = [
                ("notification", "sorry"),
                ("payment", "authorize"),
                ("payment", "void"),
                ("slot", "release"),
                ("slot", "reserve"),
            ]
            await wait_until(lambda: _effects(ledger) == expected, timeout=60, what="effects")
            async with storno.Storno(db_url) as app:
                await wait_until(lambda: _all_ended(app, "b-1"), timeout=30, what="runs ended")
                runs = await app.store.correlated("b-1")
                histories = {r.run_id: await app.store.history(r.run_id) for r in runs}
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    by_saga = {r.saga: r for r in runs}
    assert set(by_saga) == {"hold_slot", "take_payment", "notify"}
    assert by_saga["hold_slot"].status is storno.RunStatus.COMPENSATED
    assert by_saga["take_payment"].status is storno.RunStatus.COMPENSATED
    assert by_saga["notify"].status is storno.RunStatus.COMPLETED
    # One correlation id across every participant; each run names the event that began it.
    assert {r.correlation_id for r in runs} == {"b-1"}
    causes = {r.saga: histories[r.run_id][0].data["cause"] for r in runs}
    assert causes["hold_slot"]["topic"] == "booking.requested"
    assert causes["take_payment"]["topic"] == "slot.held"
    assert causes["take_payment"]["source"] == f"run {by_saga['hold_slot'].run_id}"
    assert causes["notify"]["topic"] == "payment.failed"
    signalled = [
        e for e in histories[by_saga["hold_slot"].run_id] if e.type.value == "signal_received"
    ]
    assert signalled[0].data["cause"]["topic"] == "payment.failed"


def _enqueue_booking(db_url: str, booking: dict[str, Any]) -> None:
    if db_url.startswith("sqlite"):
        conn: Any = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        schema = "public"
    else:
        import psycopg

        from conftest import _libpq

        conn = psycopg.connect(_libpq(db_url))
        schema = db_url.rsplit("schema=", 1)[1]
    try:
        storno.outbox.enqueue(
            conn, "booking.requested", booking, key=booking["id"],
            event_id=f"{booking['id']}/requested", correlation_id=booking["id"],
            source="web", schema=schema,
        )  # fmt: skip
        conn.commit()
    finally:
        conn.close()


async def _all_ended(app: storno.Storno, correlation_id: str) -> bool:
    runs = await app.store.correlated(correlation_id)
    ended = {storno.RunStatus.COMPLETED, storno.RunStatus.COMPENSATED}
    return len(runs) == 3 and all(r.status in ended for r in runs)
