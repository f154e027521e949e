"""The PostgreSQL group commit: writes issued together share one batch, and one refused write
(a taken-over lease, an event already recorded) fails alone without undoing the others."""

from __future__ import annotations

import asyncio

import pytest

import storno
from storno._model import Event, EventType, Lease
from storno._store import NewRun, open_store


def _event(seq: int, at: float = 1.0) -> Event:
    return Event(seq, EventType.RUN_CREATED, at, None, {"n": seq}, "{}" if seq == 0 else None)


@pytest.mark.postgres
async def test_one_refused_write_in_a_batch_does_not_undo_the_others(pg_schema: str) -> None:
    store = open_store(pg_schema)
    await store.open()
    try:
        for run_id in ("a", "b", "c"):
            await store.create_run(
                NewRun(run_id, "alpha", "{}", 1.0, None, _event(0)), claim_for="w", lease_seconds=30
            )
        await store.write(Lease("a", "w", 1), [_event(1)], None, now=2.0, lease_seconds=30)
        writer = store._writer  # type: ignore[attr-defined]
        # Issued in one pass of the loop: one batch. "a" repeats seq 1 (a unique violation
        # that aborts the batch), "b" is fenced (a wrong epoch), "c" is fine.
        results = await asyncio.gather(
            store.write(Lease("a", "w", 1), [_event(1, at=9.0)], None, now=3.0, lease_seconds=30),
            store.write(Lease("b", "w", 7), [_event(1)], None, now=3.0, lease_seconds=30),
            store.write(Lease("c", "w", 1), [_event(1)], None, now=3.0, lease_seconds=30),
            return_exceptions=True,
        )
        assert isinstance(results[0], storno.StoreError), results[0]
        assert isinstance(results[1], storno.LeaseLostError), results[1]
        assert results[2] == 0
        assert [e.seq for e in await store.history("c")] == [0, 1], "c's write landed once"
        assert [e.seq for e in await store.history("b")] == [0]
        assert [e.at for e in await store.history("a")] == [1.0, 1.0], "a kept its first event"
        # Concurrent writes with nothing refused share one commit.
        before = writer.commits
        await asyncio.gather(
            *(
                store.write(Lease(r, "w", 1), [_event(2)], None, now=4.0, lease_seconds=30)
                for r in ("a", "c")
            )
        )
        assert writer.commits == before + 1
    finally:
        await store.close()
