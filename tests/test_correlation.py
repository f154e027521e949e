"""Events in the views: a run's timeline shows what it emitted and the event that started it,
and a correlation id gathers the runs of one choreography in order (``storno._correlation``).
The choreography (``events_app``) runs for real on SQLite and PostgreSQL with an in-process
broker."""

from __future__ import annotations

from typing import Any

import storno
from conftest import wait_for
from events_app import make_app, order
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
