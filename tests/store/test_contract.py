"""The store contract: what every backend does the same, run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import storno
from conftest import wait_for
from storno._model import Event, EventType, InboxMessage, Lease, MessageKind
from storno._store import NewRun, RunUpdate, Store, open_store


def _event(seq: int, type: EventType = EventType.RUN_CREATED, at: float = 1.0) -> Event:
    return Event(seq, type, at, None, {"n": seq}, "{}" if seq == 0 else None)


async def _new_run(
    store: Store, run_id: str, saga: str = "alpha", *, wake_at: float | None = None
) -> None:
    await store.create_run(
        NewRun(run_id, saga, "{}", 1.0, None, _event(0), wake_at=wake_at),
        claim_for=None,
        lease_seconds=30,
    )


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    opened = open_store(db_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


# --- claims, writes, the inbox, operators ---------------------------------------------


async def test_claim_takes_due_runs_of_known_sagas_and_fences_stale_leases(store: Store) -> None:
    for run_id, saga in [("r1", "alpha"), ("r2", "beta"), ("r3", "alpha")]:
        await _new_run(store, run_id, saga)
    await _new_run(store, "r4", "alpha", wake_at=50.0)  # a scheduled start
    got = await store.claim("w", limit=10, now=2.0, lease_seconds=10, sagas=["alpha"])
    assert [r.run_id for r, _ in got] == ["r1", "r3"]
    assert all(r.status is storno.RunStatus.RUNNING and r.epoch == 1 for r, _ in got)
    assert await store.claim("v", limit=10, now=5.0, lease_seconds=10, sagas=["alpha"]) == []
    later = await store.claim("v", limit=1, now=13.0, lease_seconds=10, sagas=["alpha"])
    assert len(later) == 1 and later[0][1].epoch == 2
    taken = later[0][0].run_id
    assert await store.renew("w", ["r1", "r3"], now=13.0, lease_seconds=10) == {taken}

    # The old holder's writes are refused and leave nothing behind.
    old = next(lease for record, lease in got if record.run_id == taken)
    with pytest.raises(storno.LeaseLostError, match=f"run {taken} is no longer leased"):
        await store.write(old, [_event(1)], None, now=14.0, lease_seconds=10)
    assert [e.seq for e in await store.history(taken)] == [0]
    new = later[0][1]
    assert await store.write(new, [_event(1)], None, now=14.0, lease_seconds=10) == 0
    assert [e.seq for e in await store.history(taken)] == [0, 1]

    due = await store.claim("w", limit=10, now=60.0, lease_seconds=10, sagas=["alpha"])
    assert "r4" in [r.run_id for r, _ in due], "a scheduled start is claimable once due"


async def test_create_run_is_idempotent_by_run_id(store: Store) -> None:
    new = NewRun("same", "alpha", "{}", 1.0, None, _event(0))
    first, created = await store.create_run(new, claim_for="w", lease_seconds=30)
    again, created_again = await store.create_run(new, claim_for=None, lease_seconds=30)
    assert (created, created_again) == (True, False)
    assert again.owner == "w" and again.epoch == first.epoch == 1
    assert len(await store.history("same")) == 1


async def test_inbox_delivery_wakes_a_waiting_run_and_ignores_duplicates(store: Store) -> None:
    await _new_run(store, "r")
    assert await store.deliver("nobody", InboxMessage(MessageKind.SIGNAL, "go"), now=2.0) is None
    [(_, lease)] = await store.claim("w", limit=1, now=2.0, lease_seconds=10)
    seq = await store.write(
        lease,
        [_event(1, EventType.RUN_WAITING)],
        RunUpdate(storno.RunStatus.WAITING, release=True, wake_at=None, seen_inbox=0),
        now=3.0,
        lease_seconds=10,
    )
    assert seq == 0
    assert await store.claim("w", limit=1, now=100.0, lease_seconds=10) == []  # no wake time

    message = InboxMessage(MessageKind.SIGNAL, "go", '"x"', "m-1", {"by": "test"})
    delivery = await store.deliver("r", message, now=4.0)
    assert delivery is not None
    assert (delivery.status, delivery.seq, delivery.duplicate) == ("waiting", 1, False)
    again = await store.deliver("r", message, now=5.0)
    assert again is not None and (again.seq, again.duplicate) == (1, True)
    [got] = await store.inbox("r")
    assert (got.name, got.payload, got.message_id, got.meta, got.seq) == (
        "go",
        '"x"',
        "m-1",
        {"by": "test"},
        1,
    )
    record = await store.get_run("r")
    assert record is not None and record.wake_at == 4.0 and record.inbox_seq == 1
    [(woken, _)] = await store.claim("w", limit=1, now=4.5, lease_seconds=10)
    assert woken.status is storno.RunStatus.RUNNING and woken.wake_at is None


async def test_a_message_that_arrives_while_the_run_decides_to_wait_wakes_it(
    store: Store,
) -> None:
    await _new_run(store, "r")
    [(_, lease)] = await store.claim("w", limit=1, now=2.0, lease_seconds=10)
    await store.deliver("r", InboxMessage(MessageKind.SIGNAL, "early"), now=2.5)
    # The engine read the inbox up to 0, then decided to wait with no wake time.
    await store.write(
        lease,
        [_event(1, EventType.RUN_WAITING)],
        RunUpdate(storno.RunStatus.WAITING, release=True, seen_inbox=0),
        now=3.0,
        lease_seconds=10,
    )
    record = await store.get_run("r")
    assert record is not None and record.wake_at == 3.0, "the unseen message must wake it"
    assert len(await store.claim("w", limit=1, now=3.0, lease_seconds=10)) == 1


async def test_a_child_notifies_its_parent_in_the_same_write(store: Store) -> None:
    await _new_run(store, "parent")
    [(_, plea)] = await store.claim("w", limit=1, now=2.0, lease_seconds=10)
    await store.write(
        plea,
        [_event(1, EventType.RUN_WAITING)],
        RunUpdate(storno.RunStatus.WAITING, release=True, seen_inbox=0),
        now=3.0,
        lease_seconds=10,
    )
    await store.create_run(
        NewRun("child", "alpha", "{}", 4.0, None, _event(0), parent_run_id="parent"),
        claim_for="w",
        lease_seconds=10,
    )
    ended = InboxMessage(MessageKind.CHILD, "child", '"done"', "child-ended:child")
    await store.write(
        Lease("child", "w", 1),
        [_event(1, EventType.RUN_COMPLETED)],
        RunUpdate(
            storno.RunStatus.COMPLETED,
            result='"done"',
            release=True,
            notify_run_id="parent",
            notify=ended,
        ),
        now=5.0,
        lease_seconds=10,
    )
    [message] = await store.inbox("parent")
    assert (message.kind, message.name, message.seq) == (MessageKind.CHILD, "child", 1)
    parent = await store.get_run("parent")
    assert parent is not None and parent.wake_at == 5.0 and parent.inbox_seq == 1
    child = await store.get_run("child")
    assert child is not None and child.parent_run_id == "parent" and child.owner is None


async def test_operate_changes_only_unleased_runs_in_the_expected_state(store: Store) -> None:
    await _new_run(store, "r")
    [(_, lease)] = await store.claim("w", limit=1, now=2.0, lease_seconds=10)
    kwargs: dict[str, Any] = {
        "expected": [storno.RunStatus.COMPENSATION_FAILED],
        "status": storno.RunStatus.COMPENSATING,
        "event_type": EventType.OPERATOR_ACTION,
        "data": {"action": "retry", "by": "ops"},
        "claimable": True,
    }
    assert await store.operate("r", now=3.0, **kwargs) is None  # running, leased
    await store.write(
        lease,
        [_event(1, EventType.RUN_COMPENSATION_FAILED)],
        RunUpdate(storno.RunStatus.COMPENSATION_FAILED, error={"message": "x"}, release=True),
        now=3.0,
        lease_seconds=10,
    )
    record = await store.operate("r", now=4.0, **kwargs)
    assert record is not None and record.status is storno.RunStatus.COMPENSATING
    assert record.owner is None
    history = await store.history("r")
    assert [(e.seq, e.type) for e in history][-1] == (2, EventType.OPERATOR_ACTION)
    assert history[-1].data == {"action": "retry", "by": "ops"}
    [(claimed, new)] = await store.claim("v", limit=1, now=5.0, lease_seconds=10)
    assert claimed.status is storno.RunStatus.COMPENSATING and new.epoch == 2
    assert await store.operate("r", now=6.0, **kwargs) is None  # not in the expected state


async def test_published_state_is_kept_until_replaced(store: Store) -> None:
    await _new_run(store, "r")
    [(_, lease)] = await store.claim("w", limit=1, now=2.0, lease_seconds=10)
    await store.write(lease, [], None, now=3.0, lease_seconds=10, state='{"stage": 1}')
    await store.write(lease, [_event(1)], None, now=4.0, lease_seconds=10)
    record = await store.get_run("r")
    assert record is not None and record.state == {"stage": 1}


# --- handing leases back ----------------------------------------------------------------


async def test_released_leases_are_claimable_at_once_by_anyone(store: Store) -> None:
    for run_id in ("r1", "r2", "r3"):
        await _new_run(store, run_id)
    got = await store.claim("w", limit=3, now=2.0, lease_seconds=10)
    assert len(got) == 3
    await store.release("w", ["r1", "r2"])
    await store.release("x", ["r3"])  # not x's to hand back: left alone
    # At the same instant (a clock that stands still), not only once the leases expire.
    taken = await store.claim("v", limit=3, now=2.0, lease_seconds=10)
    assert sorted((r.run_id, lease.epoch) for r, lease in taken) == [("r1", 2), ("r2", 2)]
    assert all(r.status is storno.RunStatus.RUNNING for r, _ in taken)
    # The old holder's writes are fenced off as after any takeover.
    old = next(lease for record, lease in got if record.run_id == "r1")
    with pytest.raises(storno.LeaseLostError):
        await store.write(old, [_event(1)], None, now=3.0, lease_seconds=10)
    await store.release("w", ["r1"])  # v holds it now: nothing changes
    assert await store.renew("v", ["r1", "r2"], now=3.0, lease_seconds=10) == set()
    await store.release("w", [])


@pytest.mark.postgres
async def test_a_release_wakes_idle_workers_and_a_renewal_does_not(pg_schema: str) -> None:
    here, elsewhere = open_store(pg_schema), open_store(pg_schema)
    await here.open()
    await elsewhere.open()
    woken: list[int] = []
    try:
        elsewhere.subscribe(lambda: woken.append(1))
        await asyncio.sleep(0.3)  # the LISTEN connection is up
        await _new_run(here, "r")
        await wait_for(lambda: asyncio.sleep(0, woken))
        woken.clear()
        await here.claim("w", limit=1, now=1_000_000.0, lease_seconds=30)
        # The store's clock is far behind the wall's: a renewal is still only a renewal.
        assert await here.renew("w", ["r"], now=1_000_010.0, lease_seconds=30) == set()
        await asyncio.sleep(0.3)
        assert woken == [], "a lease renewal woke idle workers"
        await here.release("w", ["r"])
        await wait_for(lambda: asyncio.sleep(0, woken))
    finally:
        await here.close()
        await elsewhere.close()


# --- the outbox as operators read it --------------------------------------------------


async def test_outbox_rows_are_counted_by_status_and_found_by_event_id(store: Store) -> None:
    from storno._store._outbox import OutboxEntry

    def entry(event_id: str, key: str | None) -> OutboxEntry:
        return OutboxEntry(event_id, "t.x", "1", key, {}, None, None, "test", None, None, 1.0)

    many = [entry(f"e/{n}", f"k{n % 3}") for n in range(600)]  # over SQLite's chunk of ids
    assert await store.outbox.enqueue(many) == 600
    rows = await store.outbox.claim("r", "tok", limit=2, now=2.0, lease_seconds=30)
    dead = rows[0]
    assert await store.outbox.failed("tok", dead.id, "no", retry_at=2.0, max_attempts=1) == "dead"
    await store.outbox.sent("tok", [rows[1].id], now=3.0)
    assert await store.outbox.count() == 600
    assert await store.outbox.count(status="dead") == 1
    assert await store.outbox.count(status="sent") == 1
    assert await store.outbox.count(status="pending") == 598
    assert await store.outbox.count(status="discarded") == 0
    wanted = ["e/599", "nope", dead.message.event_id, *(f"e/{n}" for n in range(5, 560))]
    found = await store.outbox.find(wanted)
    assert [r.message.event_id for r in found] == [i for i in wanted if i != "nope"]
    assert found[1].status == "dead" and found[1].last_error == "no"
    assert await store.outbox.find([]) == []
