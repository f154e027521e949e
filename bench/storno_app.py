"""storno's side of every workload, through its public API only.

The saga: book_slot, charge_card and send_sms are compensable (each with its compensation),
sync_calendar is the pivot. W1 runs it to the end; W2 makes sync_calendar fail with a
TerminalError, so the engine compensates send_sms, charge_card, book_slot in that order and the
run ends ``compensated``. Steps are ``async def``, as in every peer's version.

Also a worker process for W3 (``python -m bench.storno_app w3-worker ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import storno
from bench import common

SYSTEMS = ("storno-sqlite", "storno-postgres")

DURABILITY = {
    "storno-sqlite": "SQLite WAL, synchronous=FULL (fsync at every commit; storno's default)",
    "storno-postgres": "PostgreSQL 15, synchronous_commit=on, fsync=on (server defaults)",
}

W3_WORKER_ID = "bench-w3-worker"
W3_CONCURRENCY = 200

COMPENSATED: list[str] = []
"""W2: the compensations run in this process, in order."""


# --- W1 / W2 -------------------------------------------------------------------------------


@storno.step(kind="compensable")
async def book_slot(ctx: storno.StepContext) -> str:
    return "slot"


@book_slot.compensation
async def release_slot(ctx: storno.CompensationContext[str]) -> None:
    COMPENSATED.append("release_slot")


@storno.step(kind="compensable")
async def charge_card(ctx: storno.StepContext) -> str:
    return "charge"


@charge_card.compensation
async def refund_card(ctx: storno.CompensationContext[str]) -> None:
    COMPENSATED.append("refund_card")


@storno.step(kind="compensable")
async def send_sms(ctx: storno.StepContext) -> str:
    return "sms"


@send_sms.compensation
async def send_correction_sms(ctx: storno.CompensationContext[str]) -> None:
    COMPENSATED.append("send_correction_sms")


@storno.step(kind="pivot")
async def sync_calendar(ctx: storno.StepContext, fail: bool) -> str:
    if fail:
        raise storno.TerminalError(common.W2_ERROR)
    return "calendar"


@storno.saga
async def booking(ctx: storno.SagaContext, fail: bool) -> list[str]:
    return [
        await ctx.step(book_slot),
        await ctx.step(charge_card),
        await ctx.step(send_sms),
        await ctx.step(sync_calendar, fail),
    ]


# --- W3: steps that call the provider ------------------------------------------------------


@storno.step(kind="compensable", compensate=lambda ctx: None)
async def w3_book_slot(ctx: storno.StepContext) -> str:
    return await common.provider_call(ctx.run_id, "book_slot", ctx.idempotency_key)


@storno.step(kind="compensable", compensate=lambda ctx: None)
async def w3_charge_card(ctx: storno.StepContext) -> str:
    return await common.provider_call(ctx.run_id, "charge_card", ctx.idempotency_key)


@storno.step(kind="compensable", compensate=lambda ctx: None)
async def w3_send_sms(ctx: storno.StepContext) -> str:
    return await common.provider_call(ctx.run_id, "send_sms", ctx.idempotency_key)


@storno.step(kind="pivot")
async def w3_sync_calendar(ctx: storno.StepContext) -> str:
    return await common.provider_call(ctx.run_id, "sync_calendar", ctx.idempotency_key)


@storno.saga
async def w3_booking(ctx: storno.SagaContext) -> list[str]:
    return [
        await ctx.step(w3_book_slot),
        await ctx.step(w3_charge_card),
        await ctx.step(w3_send_sms),
        await ctx.step(w3_sync_calendar),
    ]


# --- Scale: a run parked in a signal wait ----------------------------------------------------


@storno.step(kind="retryable")
async def prepare(ctx: storno.StepContext) -> str:
    return "ready"


@storno.step(kind="retryable")
async def note_wake(ctx: storno.StepContext) -> float:
    return time.time()


@storno.saga
async def parked(ctx: storno.SagaContext) -> float:
    await ctx.step(prepare)
    await ctx.wait_for_signal("wake")
    return await ctx.step(note_wake)


SAGAS = [booking, w3_booking, parked]


# --- where the runs live ---------------------------------------------------------------------


class Database:
    """A fresh database for one workload round: a SQLite file in a temporary folder, or a
    schema of its own on the PostgreSQL server (dropped afterwards)."""

    def __init__(self, system: str, folder: Path) -> None:
        self.system = system
        self.schema: str | None = None
        if system == "storno-sqlite":
            self.url = f"sqlite:///{folder / 'storno.db'}?synchronous=full"
        elif system == "storno-postgres":
            self.schema = common.fresh_name("bench_storno")
            self.url = common.with_query(common.pg_url(), schema=self.schema)
        else:
            raise ValueError(f"not a storno system: {system}")

        self.path = folder / "storno.db"

    def drop(self) -> None:
        if self.schema is not None:
            common.pg_execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    def count_waiting(self) -> int:
        """Runs in ``waiting``, read on a connection of its own (as bench/parked.py does), so
        that counting 100,000 runs does not build objects in the measured process."""
        sql = "SELECT count(*) FROM storno_runs WHERE status = 'waiting'"
        if self.schema is None:
            import sqlite3

            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            try:
                return int(conn.execute(sql).fetchone()[0])
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(common.plain_pg(common.pg_url()), autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{self.schema}"')
            row = conn.execute(sql).fetchone()
            return int(row[0]) if row else 0


async def _with_app(system: str, body: Any, **worker: Any) -> Any:
    with tempfile.TemporaryDirectory(prefix="bench-storno-") as tmp:
        db = Database(system, Path(tmp))
        try:
            async with (
                storno.Storno(db.url, sagas=SAGAS) as app,
                app.worker(**{"concurrency": 64, **worker}),
            ):
                return await body(app, db)
        finally:
            db.drop()


async def w1_seq(system: str, n: int, warmup: int) -> dict[str, Any]:
    async def body(app: storno.Storno, db: Database) -> dict[str, Any]:
        async def one() -> None:
            assert await app.run(booking, False) == ["slot", "charge", "sms", "calendar"]

        await common.run_sequential(one, warmup)
        return common.latency_result(await common.run_sequential(one, n), n)

    result: dict[str, Any] = await _with_app(system, body)
    return result


async def w1_conc(system: str, n: int, in_flight: int, warmup: int) -> dict[str, Any]:
    async def body(app: storno.Storno, db: Database) -> dict[str, Any]:
        async def one() -> None:
            await app.run(booking, False)

        await common.run_concurrent(one, warmup, in_flight)
        return await common.run_concurrent(one, n, in_flight)

    result: dict[str, Any] = await _with_app(system, body)
    return result


async def w2_seq(system: str, n: int, warmup: int) -> dict[str, Any]:
    async def body(app: storno.Storno, db: Database) -> dict[str, Any]:
        async def one() -> None:
            await app.run(booking, True)

        await common.run_expecting_failure(one, warmup, (storno.RunCompensatedError,))
        COMPENSATED.clear()
        took = await common.run_expecting_failure(one, n, (storno.RunCompensatedError,))
        expected = ["send_correction_sms", "refund_card", "release_slot"] * len(took)
        assert expected == COMPENSATED, "compensations did not run once each, in reverse"
        return common.latency_result(took, n)

    result: dict[str, Any] = await _with_app(system, body)
    return result


# --- W3 ----------------------------------------------------------------------------------------


def w3(system: str, runs: int, folder: Path) -> dict[str, Any]:
    db = Database(system, folder)
    ledger = folder / "ledger.db"
    common.init_ledger(ledger)
    env = common.child_env(BENCH_LEDGER=str(ledger))
    cmd = [sys.executable, "-m", "bench.worker", "bench.storno_app", "w3-worker", "--url", db.url]
    try:

        async def create() -> None:
            async with storno.Storno(db.url, sagas=SAGAS) as app:
                for i in range(runs):
                    await app.start(w3_booking.options(run_id=f"w3-{i:04d}"))

        asyncio.run(create())
        first = common.Gate(cmd, env, folder / "worker-1.log")
        second = common.Gate(cmd, env, folder / "worker-2.log")
        first.go()
        at_kill = common.kill_when_effects(ledger, runs * len(common.STEP_NAMES) // 2, first)
        t0 = time.perf_counter()
        second.go()
        statuses = asyncio.run(_wait_all_ended(db.url, runs))
        recovery = time.perf_counter() - t0
        second.stop()
        ended_once = asyncio.run(_ended_once(db.url))
    finally:
        db.drop()
    summary = common.ledger_summary(ledger, runs)
    return {
        "recovery_s": recovery,
        "effects_at_kill": at_kill,
        "completed": statuses.get("completed", 0),
        "statuses": statuses,
        "ended_exactly_once": ended_once,
        "lease": "lease_seconds=30 (default); the restarted worker has the same worker_id, "
        "so it takes its predecessor's runs back at once without waiting for the lease",
        **summary,
    }


async def _wait_all_ended(url: str, runs: int, timeout: float = 300.0) -> dict[str, int]:
    from storno._app import ENDED

    deadline = time.monotonic() + timeout
    async with storno.Storno(url, sagas=SAGAS) as app:
        while True:
            listed = await app.list_runs(limit=runs + 10)
            if len(listed) == runs and all(r.status in ENDED for r in listed):
                counts: dict[str, int] = {}
                for r in listed:
                    counts[r.status.value] = counts.get(r.status.value, 0) + 1
                return counts
            if time.monotonic() > deadline:
                raise RuntimeError(f"W3 runs did not all end within {timeout:.0f} s")
            await asyncio.sleep(0.005)


async def _ended_once(url: str) -> bool:
    """Each run's history holds exactly one run_completed event and its result is right."""
    async with storno.Storno(url, sagas=SAGAS) as app:
        for r in await app.list_runs(limit=100_000):
            info = await app.describe(r.run_id)
            ends = [e for e in info.history if e.type == "run_completed"]
            if len(ends) != 1 or info.result != ["slot", "charge", "sms", "calendar"]:
                return False
    return True


async def _w3_work(url: str) -> None:
    common.gate_wait()
    async with (
        storno.Storno(url, sagas=SAGAS) as app,
        app.worker(concurrency=W3_CONCURRENCY, worker_id=W3_WORKER_ID, poll_interval=0.05),
    ):
        await asyncio.to_thread(common.wait_for_stdin_close)


# --- Scale -------------------------------------------------------------------------------------


async def scale(system: str, marks: list[int], wakeups: int, park_limit: float) -> dict[str, Any]:
    async def body(app: storno.Storno, db: Database) -> dict[str, Any]:
        async def start(run_id: str) -> None:
            await app.start(parked.options(run_id=run_id))

        async def count() -> int:
            return await asyncio.to_thread(db.count_waiting)

        async def wake(run_id: str) -> float:
            await app.signal(run_id, "wake")
            woke: float = await app.get_handle(run_id).result(timeout=60)
            return woke

        result = await common.park_then_wake(
            start, count, wake, marks=marks, wakeups=wakeups, park_limit=park_limit
        )
        return {
            **result,
            "rss_of": "the one process that starts, parks, signals and executes the runs",
        }

    result: dict[str, Any] = await _with_app(system, body, concurrency=64)
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["w3-worker"])
    parser.add_argument("--url", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("BENCH_LEDGER", "")
    asyncio.run(_w3_work(args.url))
