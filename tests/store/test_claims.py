"""The claim plan both backends follow, on its own and through each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from storno._model import Event, EventType
from storno._store import NewRun, Store, open_store
from storno._store._claims import Batch, ClaimPlan


def test_a_claim_with_no_room_or_no_sagas_takes_nothing() -> None:
    assert ClaimPlan.of(0, None, None) is None
    assert ClaimPlan.of(5, [], {"a": 1}) is None


def test_capped_sagas_are_claimed_in_batches_of_their_own_in_name_order() -> None:
    plan = ClaimPlan.of(10, ["a", "b", "c"], {"c": 2, "b": 1, "other": 3})
    assert plan is not None
    assert plan.free_batch() == Batch(("a",), ("b", "c"), 10)
    assert plan.capped == (("b", 1), ("c", 2))
    assert plan.capped_batch("c", 2, executing=1, claimed=0) == Batch(("c",), (), 1)
    assert plan.capped_batch("c", 2, executing=2, claimed=0) is None  # the limit is reached
    assert plan.capped_batch("c", 2, executing=0, claimed=9) == Batch(("c",), (), 1)
    assert plan.capped_batch("c", 2, executing=0, claimed=10) is None  # the claim is full


def test_any_saga_means_any_but_the_capped_ones() -> None:
    plan = ClaimPlan.of(3, None, {"slow": 1})
    assert plan is not None and plan.free_batch() == Batch(None, ("slow",), 3)
    only_capped = ClaimPlan.of(3, ["slow"], {"slow": 1})
    assert only_capped is not None and only_capped.free_batch() is None


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    opened = open_store(db_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def _new_runs(store: Store, *specs: tuple[str, str, float]) -> None:
    for run_id, saga, created in specs:
        event = Event(0, EventType.RUN_CREATED, created, None, {}, "{}")
        new = NewRun(run_id, saga, "{}", created, None, event)
        await store.create_run(new, claim_for=None, lease_seconds=30)


async def test_claims_take_own_runs_after_a_restart_but_never_excluded_ones(store: Store) -> None:
    await _new_runs(store, ("r1", "a", 1.0), ("r2", "a", 2.0), ("r3", "a", 3.0))
    assert len(await store.claim("w", limit=3, now=5.0, lease_seconds=60)) == 3
    assert await store.claim("w", limit=3, now=6.0, lease_seconds=60) == []  # leases live
    again = await store.claim(
        "w", limit=3, now=6.0, lease_seconds=60, include_own=True, exclude=["r2"]
    )
    assert [(r.run_id, lease.epoch) for r, lease in again] == [("r1", 2), ("r3", 2)]
    assert await store.claim("v", limit=3, now=6.0, lease_seconds=60, include_own=True) == []


async def test_claims_go_oldest_first_and_keep_to_saga_limits(store: Store) -> None:
    await _new_runs(
        store,
        ("c1", "capped", 1.0),
        ("f1", "free", 2.0),
        ("c2", "capped", 3.0),
        ("f2", "free", 4.0),
    )
    got = await store.claim("w", limit=10, now=5.0, lease_seconds=60, limits={"capped": 1})
    assert [r.run_id for r, _ in got] == ["c1", "f1", "f2"]
    assert await store.claim("v", limit=10, now=5.0, lease_seconds=60, limits={"capped": 1}) == []
    more = await store.claim("v", limit=1, now=5.0, lease_seconds=60, limits={"capped": 2})
    assert [r.run_id for r, _ in more] == ["c2"]
