"""The API's outbox and correlation endpoints and the outbox metrics, over real HTTP on
loopback against a real store (SQLite and PostgreSQL).

Dead letters are made the way a relay makes them (claimed, then refused with no attempt
left: ``events_app.make_dead``) where the test is about the API; the last test runs the
choreography and its relay in the server's worker with an in-process broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from events_app import RELAY_OPTIONS, charge, confirm, enqueue, make_dead, order, payment
from storno._store import open_store
from storno.events import EventMessage, MemoryBroker
from test_http import error_of
from test_metrics import samples, value
from test_server_support import (
    READ_TOKEN,
    WEBHOOK_TOKEN,
    serving,
    start,
    wait_status,
    wait_until,
)

ROWS = [
    ("orders/1/placed", "order.placed", "o-1", {"order": 1}),
    ("orders/2/placed", "order.placed", "o-2", {"order": 2, "note": "<b>big</b>"}),
    ("orders/2/paid", "order.paid", "o-2", {"order": 2}),  # waits behind its key's dead letter
    ("orders/3/placed", "order.placed", "o-3", {"order": 3}),
]


def dead_letters(db_url: str, event_ids: list[str]) -> None:
    async def go() -> None:
        store = open_store(db_url)
        await store.open()
        try:
            await make_dead(store, event_ids)
        finally:
            await store.close()

    asyncio.run(go())


def test_the_outbox_is_read_by_readers_and_its_dead_letters_acted_on_by_operators(
    db_url: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="storno.outbox")
    with serving(db_url, worker=False) as s, s.client() as c, s.client(READ_TOKEN) as reader:
        enqueue(db_url, *ROWS, source="orders-service")
        dead_letters(db_url, ["orders/2/placed", "orders/3/placed"])

        page = reader.get("/api/v1/outbox")
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["stats"]["pending"] == 2 and body["stats"]["dead"] == 2
        assert body["stats"]["oldest_pending_at"] is not None
        assert body["stats"]["lag_seconds"] >= 0
        assert [r["event_id"] for r in body["rows"]] == [r[0] for r in reversed(ROWS)]
        assert body["next_offset"] is None and body["status"] is None
        [dead, _] = reader.get("/api/v1/outbox", params={"status": "dead"}).json()["rows"]
        assert dead["event_id"] == "orders/3/placed" and dead["status"] == "dead"
        assert dead["attempts"] == 1 and dead["last_error"] == "refused: too big"
        assert dead["source"] == "orders-service" and dead["payload"] == {"order": 3}
        assert dead["created_at"].endswith("+00:00") and dead["run_id"] is None
        first = reader.get("/api/v1/outbox", params={"limit": 1}).json()
        assert [r["event_id"] for r in first["rows"]] == ["orders/3/placed"]
        assert first["next_offset"] == 1
        last = reader.get("/api/v1/outbox", params={"limit": 1, "offset": 3}).json()
        assert [r["event_id"] for r in last["rows"]] == ["orders/1/placed"]
        assert last["next_offset"] is None

        error_of(reader.get("/api/v1/outbox", params={"stauts": "dead"}), 422, "unknown_parameter")
        error_of(reader.get("/api/v1/outbox", params={"status": "lost"}), 422, "validation_error")
        with s.client(token=None) as anonymous:
            error_of(anonymous.get("/api/v1/outbox"), 401, "unauthorized")
        with s.client(WEBHOOK_TOKEN) as hook:
            error_of(hook.get("/api/v1/outbox"), 403, "forbidden")

        # Acting: operators only; only dead letters; ids with slashes as they are or encoded.
        error_of(reader.post("/api/v1/outbox/orders%2F2%2Fplaced/discard"), 403, "forbidden")
        refused = c.post("/api/v1/outbox/orders%2F1%2Fplaced/retry")
        assert "'orders/1/placed' (pending)" in error_of(refused, 409, "event_state")
        error_of(c.post("/api/v1/outbox/no%2Fsuch/retry"), 404, "event_not_found")
        bad = c.post("/api/v1/outbox/orders%2F2%2Fplaced/discard", json={"colour": "red"})
        error_of(bad, 422, "validation_error")

        gone = c.post(
            "/api/v1/outbox/orders%2F2%2Fplaced/discard", json={"by": "carol", "note": "poison"}
        )
        assert gone.status_code == 200, gone.text
        assert gone.json()["action"] == "discard" and gone.json()["by"] == "carol (via ops-alice)"
        assert gone.json()["row"]["status"] == "discarded"
        again = c.post("/api/v1/outbox/orders/3/placed/retry")  # the slashes unencoded
        assert again.status_code == 200, again.text
        row = again.json()["row"]
        assert (
            row["status"] == "pending"
            and row["attempts"] == 0
            and again.json()["by"] == "ops-alice"
        )
        error_of(c.post("/api/v1/outbox/orders%2F2%2Fplaced/retry"), 409, "event_state")
        stats = reader.get("/api/v1/outbox").json()["stats"]
        assert stats == {**stats, "pending": 3, "dead": 0}
    logged = [r.getMessage() for r in caplog.records if r.name == "storno.outbox"]
    assert logged == [
        "outbox event orders/2/placed (order.placed, key 'o-2') discarded by carol (via "
        "ops-alice): poison",
        "outbox event orders/3/placed (order.placed, key 'o-3') retried by ops-alice",
    ]


def _refuse_poison(message: EventMessage) -> BaseException | None:
    return ValueError("message too large") if message.topic == "poison.big" else None


def test_a_choreography_its_correlation_and_the_outbox_metrics(db_url: str):
    broker = MemoryBroker()
    events = {"broker": broker, "handlers": [charge, confirm], "relay_options": RELAY_OPTIONS}
    with (
        serving(db_url, app_options=events, extra_sagas=(order, payment)) as s,
        s.client() as c,
        s.client(READ_TOKEN) as reader,
    ):
        run_id = start(c, "order", "A1", run_id="ord/1")
        assert wait_status(c, "ord%2F1", "completed")["result"] == {"slot": "A1", "amount": 40}
        paid = "ord/1/1@charge"
        shown = reader.get(f"/api/v1/runs/{paid.replace('/', '%2F')}").json()
        assert shown["correlation_id"] == run_id
        assert reader.get("/api/v1/runs/ord%2F1").json()["correlation_id"] is None

        found = reader.get("/api/v1/correlations/ord%2F1")
        assert found.status_code == 200, found.text
        body = found.json()
        assert body["correlation_id"] == run_id and body["truncated"] is False
        first, second = body["runs"]
        assert (first["run"]["id"], second["run"]["id"]) == (run_id, paid)
        assert first["cause"] is None and second["run"]["saga"] == "payment"
        assert [e["topic"] for e in first["emitted"]] == ["slot.reserved", "order.done"]
        assert second["cause"]["event_id"] == "ord/1/1" and second["cause"]["consumer"] == "charge"
        assert (
            second["cause"]["source"] == "run ord/1" and second["cause"]["source_run_id"] == run_id
        )
        [signal] = first["signals"]
        assert signal["name"] == "paid" and signal["cause"]["event_id"] == f"{paid}/0"
        kinds = [(e["run_id"], e["kind"]) for e in body["entries"]]
        assert kinds.index((paid, "started")) > kinds.index((run_id, "emitted"))
        assert kinds.index((run_id, "signalled")) > kinds.index((paid, "emitted"))
        assert kinds[-1] == (run_id, "ended")
        reserved = next(e for e in body["entries"] if e["kind"] == "emitted")
        assert reserved["consumed_by"] == [paid]
        assert reader.get("/api/v1/correlations/ord/1").json() == body  # the slash as it is
        error_of(reader.get("/api/v1/correlations/nobody"), 404, "correlation_not_found")
        with s.client(token=None) as anonymous:
            error_of(anonymous.get("/api/v1/correlations/ord%2F1"), 401, "unauthorized")

        def metrics() -> dict[Any, float]:
            return samples(reader.get("/metrics").text)

        m = metrics()
        for topic in ("slot.reserved", "payment.charged", "order.done"):
            assert value(m, "storno_events_emitted_total", topic=topic) == 1
        wait_until(lambda: value(metrics(), "storno_outbox_pending") == 0, what="all sent")
        assert value(m, "storno_outbox_dead") == 0 and value(m, "storno_outbox_lag_seconds") == 0

        # A poison event becomes a dead letter and holds its key's next event back.
        broker.refuse = _refuse_poison
        enqueue(db_url, ("p-1", "poison.big", "k", "x" * 100), ("p-2", "poison.after", "k", 2))
        wait_until(lambda: value(metrics(), "storno_outbox_dead") == 1, what="a dead letter")
        time.sleep(0.3)
        m = metrics()
        assert value(m, "storno_outbox_pending") == 1
        assert value(m, "storno_outbox_lag_seconds") >= 0.3
        assert [r.event_id for r in broker.published][-1] != "p-2"
        broker.refuse = None
        retried = c.post("/api/v1/outbox/p-1/retry", json={"note": "the limit was raised"})
        assert retried.status_code == 200, retried.text
        wait_until(lambda: value(metrics(), "storno_outbox_pending") == 0, what="drained")
        assert [m.event_id for m in broker.published][-2:] == ["p-1", "p-2"]
        assert value(metrics(), "storno_outbox_dead") == 0
