"""Recorded histories replayed against the current saga code, as a deploy would meet them.

Each file in tests/histories/ is the history of a real run of a saga in tests/replay_sagas.py.
A replay stores the history, up to the event that ended the run, in a fresh store as a run
whose lease was handed back, and lets a worker resume it: the worker must finish the run from
the history alone (no step body or compensation runs again) with the recorded outcome, or,
where the code no longer matches the history, park it ``needs_attention`` with the
:class:`storno.DeterminismError`'s message.

``python tests/test_histories.py`` records the histories again (run it from the project root).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

import storno
from conftest import wait_for
from storno._model import Event, EventType, Lease
from storno._store import NewRun, open_store

HERE = Path(__file__).resolve().parent
HISTORIES = HERE / "histories"
sys.path.insert(0, str(HERE))
import replay_sagas  # noqa: E402  (the sagas live beside the tests)

ENDINGS = {
    EventType.RUN_COMPLETED,
    EventType.RUN_COMPENSATED,
    EventType.RUN_COMPENSATION_FAILED,
    EventType.RUN_NEEDS_ATTENTION,
    EventType.RUN_CANCELLED,
}
RECORDER = "recorder"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((HISTORIES / f"{name}.json").read_text())
    return data


def events_of(recorded: dict[str, Any]) -> list[Event]:
    return [
        Event(e["seq"], EventType(e["type"]), e["at"], e["position"], e["data"], e["payload"])
        for e in recorded["events"]
    ]


async def replay(db_url: str, recorded: dict[str, Any]) -> storno.RunInfo:
    """Resume a recorded run from its history with the current code; the run once settled.

    The history goes in through the store's own operations: the run is created leased to a
    recorder, the recorded events up to the run's end are written under that lease, and the
    lease is handed back, so the next claim resumes the run as after a worker stopped.
    """
    events = events_of(recorded)
    cut = next((i for i, e in enumerate(events) if e.type in ENDINGS), len(events))
    run_id = recorded["run_id"]
    store = open_store(db_url)
    await store.open()
    try:
        first = events[0]
        new = NewRun(run_id, recorded["saga"], recorded["input"], first.at, None, first)
        await store.create_run(new, claim_for=RECORDER, lease_seconds=60)
        lease = Lease(run_id, RECORDER, 1)
        await store.write(lease, events[1:cut], None, now=events[cut - 1].at, lease_seconds=60)
        await store.release(RECORDER, [run_id])
    finally:
        await store.close()
    async with storno.Storno(db_url, sagas=replay_sagas.SAGAS) as app, app.worker():
        handle = app.get_handle(run_id)
        with contextlib.suppress(storno.RunFailedError):  # the run's state says which
            await handle.result(timeout=10)
        return await handle.describe()


async def history_of(db_url: str, run_id: str) -> list[Event]:
    store = open_store(db_url)
    await store.open()
    try:
        return await store.history(run_id)
    finally:
        await store.close()


@pytest.fixture(autouse=True)
def _no_calls() -> None:
    replay_sagas.CALLS.clear()


@pytest.mark.parametrize("name", ["booking-completed", "booking-compensated", "approved-booking"])
async def test_a_recorded_run_replays_to_its_recorded_outcome(db_url: str, name: str) -> None:
    recorded = load(name)
    info = await replay(db_url, recorded)
    assert info.status.value == recorded["status"]
    assert replay_sagas.CALLS == [], "a replay ran step code again"
    if info.status is storno.RunStatus.COMPLETED:
        assert info.result == recorded["result"]
    # The resumed run kept the recorded history, took no step or compensation again, and
    # ended as the recorded run did.
    recorded_events = events_of(recorded)
    cut = next(i for i, e in enumerate(recorded_events) if e.type in ENDINGS)
    history = await history_of(db_url, recorded["run_id"])
    assert [(e.seq, e.type, e.data) for e in history[:cut]] == [
        (e.seq, e.type, e.data) for e in recorded_events[:cut]
    ]
    added = {e.type for e in history[cut:]}
    assert added <= {EventType.RUN_RESUMED, EventType.COMPENSATION_STARTED} | ENDINGS, added
    assert history[-1].type is recorded_events[cut].type


async def test_a_history_the_code_no_longer_matches_is_parked_as_non_deterministic(
    db_url: str,
) -> None:
    recorded = load("shipping-nondeterministic")
    info = await replay(db_url, recorded)
    assert info.status is storno.RunStatus.NEEDS_ATTENTION
    assert info.error is not None, "a parked run says why"
    assert info.error.get("type") == "storno.DeterminismError", info.error
    message = info.error["message"]
    assert "asks for step 'reserve' but the history recorded step 'notify'" in message
    assert replay_sagas.CALLS == []
    history = await history_of(db_url, recorded["run_id"])
    assert history[-1].type is EventType.RUN_NEEDS_ATTENTION


# --- recording ---------------------------------------------------------------------------


async def _is_waiting(handle: storno.RunHandle[Any]) -> bool:
    return await handle.status() is storno.RunStatus.WAITING


async def record(folder: Path) -> None:
    """Run each saga once on a fresh SQLite file and write its history as JSON."""
    scenarios: list[tuple[str, storno.Saga[..., Any], tuple[Any, ...]]] = [
        ("booking-completed", replay_sagas.booking, (100, "see you at 10:00")),
        ("booking-compensated", replay_sagas.booking, (100, "refused")),
        ("approved-booking", replay_sagas.approved_booking, (250,)),
        ("shipping-nondeterministic", replay_sagas.shipping_as_it_was, (40,)),
    ]
    for name, saga, args in scenarios:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/record.db"
            async with storno.Storno(url, sagas=[saga]) as app, app.worker():
                handle = await app.start(saga.options(run_id=name), *args)
                if saga is replay_sagas.approved_booking:
                    await wait_for(functools.partial(_is_waiting, handle))
                    await app.signal(handle.run_id, "go", {"by": "ops"})
                with contextlib.suppress(storno.RunFailedError):
                    await handle.result(timeout=10)
                record_ = await app.store.get_run(handle.run_id)
                history = await app.store.history(handle.run_id)
            assert record_ is not None
            data = {
                "run_id": record_.run_id,
                "saga": record_.saga,
                "input": record_.input,
                "status": record_.status.value,
                "result": json.loads(record_.result) if record_.result else None,
                "events": [
                    {
                        "seq": e.seq,
                        "type": e.type.value,
                        "at": e.at,
                        "position": e.position,
                        "data": e.data,
                        "payload": e.payload,
                    }
                    for e in history
                ],
            }
            text = json.dumps(data, indent=1, sort_keys=True) + "\n"
            (folder / f"{name}.json").write_text(text)


if __name__ == "__main__":
    HISTORIES.mkdir(exist_ok=True)
    asyncio.run(record(HISTORIES))
