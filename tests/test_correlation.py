"""Events in the views: a run's timeline shows what it emitted and the event that started it,
and a correlation id gathers the runs of one choreography in order (``storno._correlation``).
The choreography (``events_app``) runs for real on SQLite and PostgreSQL with an in-process
broker."""

from __future__ import annotations

from typing import Any

import storno
from conftest import wait_for
from events_app import enqueue, make_app, order
from storno._correlation import correlation_of, load_correlation
from storno._timeline import build_timeline
from storno.events import MemoryBroker


async def test_a_run_an_event_started_emits_under_the_events_correlation_id(db_url: str):
    # A handler's run is started in the worker's process, which executes it at once; the
    # events it emits must carry the correlation id it was started under, not its own run id.
    app = make_app(db_url, MemoryBroker())
    async with app, app.worker(poll_interval=0.05):
        await app.start(order.options(run_id="order-1"), "A1")
        payment_id = "order-1/1@charge"

        async def paid() -> Any:
            run = await app.store.get_run(payment_id)
            return run is not None and run.status is storno.RunStatus.COMPLETED

        await wait_for(paid)
        record = await app.store.get_run(payment_id)
        history = await app.store.history(payment_id)
        [emitted] = [e for e in history if e.type.value == "event_emitted"]
        assert record is not None and record.correlation_id == "order-1"
        assert emitted.data["correlation_id"] == "order-1"
        assert emitted.data["causation_id"] == "order-1/1"
        handle = app.get_handle("order-1")
        assert await handle.result(timeout=20) == {"slot": "A1", "amount": 40}


async def run_choreography(db_url: str, run_id: str = "order-1") -> storno.Storno:
    """The order and what its events cause, to their ends; the application, open."""
    app = make_app(db_url, MemoryBroker())
    await app.open()
    async with app.worker(poll_interval=0.05):
        handle = await app.start(order.options(run_id=run_id), "A1")
        assert await handle.result(timeout=20) == {"slot": "A1", "amount": 40}

        async def sent() -> bool:
            return (await app.store.outbox.stats()).pending == 0

        await wait_for(sent)
    return app


async def test_the_timeline_places_emitted_events_and_names_their_causes(db_url: str):
    app = await run_choreography(db_url)
    try:
        ordered = build_timeline(await app.describe("order-1"))
        paid = build_timeline(await app.describe("order-1/1@charge"))
    finally:
        await app.close()
    assert [(i.position, i.kind, i.name) for i in ordered.forward] == [
        (0, "step", "hold"),
        (1, "emit", "slot.reserved"),
        (2, "signal", "paid"),
        (3, "emit", "order.done"),
    ]
    first, last = ordered.emitted
    assert (first.event_id, first.key, first.payload) == (
        "order-1/1",
        "A1",
        {"slot": "A1", "held": "held-A1"},
    )
    assert last.event_id == "order-1/3" and ordered.forward[1].emitted == first
    assert ordered.cause is None and first.causation_id is None
    wait = ordered.forward[2]
    assert wait.cause is not None and wait.cause.event_id == "order-1/1@charge/0"
    assert wait.cause.topic == "payment.charged" and wait.cause.consumer == "confirm"
    assert wait.cause.source_run == "order-1/1@charge" and wait.by == "event"
    received = next(e for e in ordered.events if e.kind == "signal_received")
    assert received.cause == wait.cause

    cause = paid.cause
    assert cause is not None and cause.event_id == "order-1/1" and cause.topic == "slot.reserved"
    assert cause.source == "run order-1" and cause.source_run == "order-1"
    assert cause.consumer == "charge" and cause.emitted_at is not None
    assert [e.causation_id for e in paid.emitted] == ["order-1/1"]
    assert paid.events[0].kind == "run_created" and paid.events[0].cause == cause


async def test_a_correlation_is_its_runs_in_order_and_one_timeline(db_url: str):
    app = await run_choreography(db_url)
    try:
        found = await load_correlation(app, "order-1")
        also = await load_correlation(app, "order-1", limit=1)
        none = await load_correlation(app, "nobody")
        plain = await app.describe((await app.start(lonely, "x")).run_id)
    finally:
        await app.close()
    paid = "order-1/1@charge"
    assert [r.info.run_id for r in found.runs] == ["order-1", paid] and not found.truncated
    assert [r.info.run_id for r in also.runs] == ["order-1"] and also.truncated
    assert none.runs == [] and none.entries == []
    first, second = found.runs
    assert first.cause is None and [e.topic for e in first.emitted] == [
        "slot.reserved",
        "order.done",
    ]
    assert [(s.name, s.cause.event_id) for s in first.signals] == [("paid", f"{paid}/0")]
    assert second.cause is not None and second.cause.event_id == "order-1/1"
    assert first.ended_at is not None and second.ended_at is not None
    assert [(e.run_id, e.kind) for e in found.entries] == [
        ("order-1", "started"),
        ("order-1", "emitted"),
        (paid, "started"),
        (paid, "emitted"),
        (paid, "ended"),
        ("order-1", "signalled"),
        ("order-1", "emitted"),
        ("order-1", "ended"),
    ]
    assert found.entries[1].consumed_by == (paid,) and found.entries[3].consumed_by == ("order-1",)
    assert found.entries[-2].consumed_by == ()
    assert correlation_of(first.info) == "order-1" and correlation_of(second.info) == "order-1"
    assert correlation_of(plain) is None
    as_json = found.to_json()
    assert as_json["entries"][2]["cause"]["source_run_id"] == "order-1"
    assert as_json["runs"][1]["run"]["correlation_id"] == "order-1"


@storno.saga
async def lonely(ctx: storno.SagaContext, what: str) -> str:
    return what


@storno.saga
async def leg(ctx: storno.SagaContext, n: int) -> int:
    ctx.emit("leg.booked", {"n": n})
    return n


@storno.saga
async def trip(ctx: storno.SagaContext, legs: int) -> list[int]:
    return list(await ctx.gather(*(ctx.child(leg, n) for n in range(legs))))


@storno.on("trip.requested", name="plan")
def plan(message: storno.EventMessage) -> storno.events.Start:
    return storno.events.start(trip, message.data["legs"])


async def test_a_services_event_begins_a_correlation_that_child_runs_join(db_url: str):
    broker = MemoryBroker()
    app = storno.Storno(db_url, sagas=[trip, leg], broker=broker, handlers=[plan])
    async with app, app.worker(poll_interval=0.05):
        enqueue(db_url, ("trip-7", "trip.requested", "t-7", {"legs": 2}), source="travel-desk")

        async def done() -> bool:
            run = await app.store.get_run("trip-7@plan")
            return run is not None and run.status is storno.RunStatus.COMPLETED

        await wait_for(done)
        found = await load_correlation(app, "trip-7")
        rows = await app.store.outbox.find(["trip-7@plan/0/0", "trip-7@plan/1/0", "nope"])
    runs = {r.info.run_id: r for r in found.runs}
    assert set(runs) == {"trip-7@plan", "trip-7@plan/0", "trip-7@plan/1"}
    top = runs["trip-7@plan"]
    assert top.cause is not None and top.cause.source == "travel-desk"
    assert top.cause.source_run is None and top.cause.consumer == "plan"
    child = runs["trip-7@plan/1"]
    assert child.info.parent_run_id == "trip-7@plan" and child.info.correlation_id == "trip-7"
    assert [e.event_id for e in child.emitted] == ["trip-7@plan/1/0"]
    started = [e for e in found.entries if e.kind == "started"]
    assert [e.parent_run_id for e in started] == [None, "trip-7@plan", "trip-7@plan"]
    assert [r.message.correlation_id for r in rows] == ["trip-7", "trip-7"]
