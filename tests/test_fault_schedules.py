"""The seeds' sagas under thousands of seeded fault schedules at a FakeProvider.

Each schedule mixes 500s and 429s that come before the provider's key check, answers lost
after the write, writes that land late, outages, declines and worker crashes mid-call; the
ledger must satisfy check_fault_schedules' invariants for every run. The seed is fixed so
that a failure reproduces (the message says how); ``STORNO_FAULT_SEED`` picks another, and
``STORNO_FAULT_SCHEDULES=N`` runs the slow variant with N schedules per saga.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import storno
from fault_sagas import BOOKING_OPERATIONS, INVOICING_OPERATIONS, booking, invoicing
from storno.testing import FakeProvider, check_fault_schedules

SEED = int(os.environ.get("STORNO_FAULT_SEED", "2024"))
SCHEDULES = 2000
MANY = int(os.environ.get("STORNO_FAULT_SCHEDULES", "0"))

SAGAS = {
    "booking": (booking, BOOKING_OPERATIONS, ["ada", "mon-10", 120]),
    "invoicing": (invoicing, INVOICING_OPERATIONS, ["acme", 900]),
}


async def check(tmp_path: Path, name: str, schedules: int) -> None:
    build, operations, args = SAGAS[name]
    provider = FakeProvider(tmp_path / "ledger.db", operations)
    saga: storno.Saga[..., Any]
    saga, steps = build(provider)
    report = await check_fault_schedules(
        saga,
        args,
        provider=provider,
        steps=steps,
        schedules=schedules,
        seed=SEED,
        folder=tmp_path,
        raise_on_failure=False,
    )
    # The schedules reach what they are meant to: crashes, lost answers, every kind of end.
    assert len(report.outcomes) == schedules
    assert sum(bool(o.schedule.crashes) for o in report.outcomes) > schedules // 20
    assert sum(o.schedule.loses_answers for o in report.outcomes) > schedules // 3
    assert report.ends["completed"] > schedules // 2
    assert report.ends["compensated"] > schedules // 20
    report.raise_for_failures()


@pytest.mark.parametrize("name", sorted(SAGAS))
async def test_seed_sagas_keep_the_ledger_invariants_under_fault_schedules(
    tmp_path: Path, name: str
) -> None:
    await check(tmp_path, name, SCHEDULES)


@pytest.mark.slow
@pytest.mark.skipif(not MANY, reason="set STORNO_FAULT_SCHEDULES=N to run N schedules per saga")
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", sorted(SAGAS))
async def test_seed_sagas_under_many_more_fault_schedules(tmp_path: Path, name: str) -> None:
    await check(tmp_path, name, MANY)
