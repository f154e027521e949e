"""DBOS Transact (PyPI ``dbos``), as its documentation writes a workflow: ``@DBOS.workflow()``
calling ``@DBOS.step()`` functions, all ``async def``.

DBOS has no saga construct: the workflow keeps a list of the compensations of the steps that
completed and, when a step fails, runs them in reverse as steps of their own, then re-raises
(the pattern DBOS's docs show with try/except). The idempotency key a step sends to the
provider is the workflow id plus the step id (``DBOS.workflow_id``, ``DBOS.step_id``), as
DBOS's docs recommend.

Runs on DBOS's SQLite default (``sqlite:///file``, which DBOS opens with SQLite's defaults: a
rollback journal and synchronous=FULL) and on the local PostgreSQL, with a system schema of
its own per round (``dbos_system_schema``).

Also a worker process for W3 (``python -m bench.peers.dbos_app w3-worker ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dbos import DBOS, DBOSClient, DBOSConfig, EnqueueOptions, SetWorkflowID

from bench import common

DURABILITY = {
    "dbos-sqlite": "SQLite as DBOS opens it: rollback journal (DELETE), synchronous=FULL",
    "dbos-postgres": "PostgreSQL 15, synchronous_commit=on, fsync=on (server defaults)",
}

COMPENSATED: list[str] = []


class CalendarRefused(Exception):
    """W2: the calendar refuses for good (DBOS steps are not retried unless asked to)."""


# --- W1 / W2 -------------------------------------------------------------------------------


@DBOS.step()
async def book_slot() -> str:
    return "slot"


@DBOS.step()
async def release_slot() -> None:
    COMPENSATED.append("release_slot")


@DBOS.step()
async def charge_card() -> str:
    return "charge"


@DBOS.step()
async def refund_card() -> None:
    COMPENSATED.append("refund_card")


@DBOS.step()
async def send_sms() -> str:
    return "sms"


@DBOS.step()
async def send_correction_sms() -> None:
    COMPENSATED.append("send_correction_sms")


@DBOS.step()
async def sync_calendar(fail: bool) -> str:
    if fail:
        raise CalendarRefused(common.W2_ERROR)
    return "calendar"


@DBOS.workflow()
async def booking(fail: bool) -> list[str]:
    compensations: list[Callable[[], Awaitable[None]]] = []
    try:
        slot = await book_slot()
        compensations.append(release_slot)
        charge = await charge_card()
        compensations.append(refund_card)
        sms = await send_sms()
        compensations.append(send_correction_sms)
        calendar = await sync_calendar(fail)
    except Exception:
        for compensate in reversed(compensations):
            await compensate()
        raise
    return [slot, charge, sms, calendar]


# --- W3 --------------------------------------------------------------------------------------

W3_QUEUE = "bench_w3"
"""W3's sagas are enqueued by the driver before any worker runs (DBOS's way to hand work to
worker processes); the queue is registered with a 50 ms polling interval (DBOS's default is
1 s), no concurrency limit."""


def _key() -> str:
    return f"{DBOS.workflow_id}/{DBOS.step_id}"


@DBOS.step()
async def w3_book_slot() -> str:
    return await common.provider_call(str(DBOS.workflow_id), "book_slot", _key())


@DBOS.step()
async def w3_charge_card() -> str:
    return await common.provider_call(str(DBOS.workflow_id), "charge_card", _key())


@DBOS.step()
async def w3_send_sms() -> str:
    return await common.provider_call(str(DBOS.workflow_id), "send_sms", _key())


@DBOS.step()
async def w3_sync_calendar() -> str:
    return await common.provider_call(str(DBOS.workflow_id), "sync_calendar", _key())


@DBOS.step()
async def w3_undo() -> None:
    return None


@DBOS.workflow()
async def w3_booking() -> list[str]:
    compensations: list[Callable[[], Awaitable[None]]] = []
    try:
        slot = await w3_book_slot()
        compensations.append(w3_undo)
        charge = await w3_charge_card()
        compensations.append(w3_undo)
        sms = await w3_send_sms()
        compensations.append(w3_undo)
        calendar = await w3_sync_calendar()
    except Exception:
        for compensate in reversed(compensations):
            await compensate()
        raise
    return [slot, charge, sms, calendar]


# --- Scale -----------------------------------------------------------------------------------


@DBOS.step()
async def prepare() -> str:
    return "ready"


@DBOS.step()
async def note_wake() -> float:
    return time.time()


@DBOS.workflow()
async def parked() -> float:
    await prepare()
    await DBOS.recv_async("wake", timeout_seconds=24 * 3600)
    return await note_wake()


# --- where the workflows live ---------------------------------------------------------------


class Database:
    def __init__(self, system: str, folder: Path) -> None:
        self.schema: str | None = None
        self.path = folder / "dbos.sqlite"
        if system == "dbos-sqlite":
            self.url = f"sqlite:///{self.path}"
        elif system == "dbos-postgres":
            self.schema = common.fresh_name("bench_dbos")
            self.url = common.plain_pg(common.pg_url())
        else:
            raise ValueError(f"not a DBOS system: {system}")

    def config(self) -> DBOSConfig:
        config: DBOSConfig = {
            "name": "bench",
            "system_database_url": self.url,
            "log_level": "WARNING",
        }
        if self.schema is not None:
            config["dbos_system_schema"] = self.schema
        return config

    def drop(self) -> None:
        if self.schema is not None:
            common.pg_execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    def count(self, status: str) -> int:
        sql = "SELECT count(*) FROM workflow_status WHERE status = ?"
        if self.schema is None:
            # Read-write: a reader may have to roll back the hot journal a killed writer left.
            conn = sqlite3.connect(self.path, timeout=30)
            try:
                return int(conn.execute(sql, (status,)).fetchone()[0])
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute(
                f'SELECT count(*) FROM "{self.schema}".workflow_status WHERE status = %s',
                (status,),
            ).fetchone()
            return int(row[0]) if row else 0


async def _with_dbos(system: str, body: Callable[[Database], Awaitable[Any]]) -> Any:
    with tempfile.TemporaryDirectory(prefix="bench-dbos-") as tmp:
        db = Database(system, Path(tmp))
        DBOS(config=db.config())
        DBOS.launch()
        try:
            return await body(db)
        finally:
            DBOS.destroy(destroy_registry=False)
            db.drop()


async def w1_seq(system: str, n: int, warmup: int) -> dict[str, Any]:
    async def body(db: Database) -> dict[str, Any]:
        async def one() -> None:
            assert await booking(False) == ["slot", "charge", "sms", "calendar"]

        await common.run_sequential(one, warmup)
        return common.latency_result(await common.run_sequential(one, n), n)

    result: dict[str, Any] = await _with_dbos(system, body)
    return result


async def w1_conc(system: str, n: int, in_flight: int, warmup: int) -> dict[str, Any]:
    async def body(db: Database) -> dict[str, Any]:
        async def one() -> None:
            await booking(False)

        await common.run_concurrent(one, warmup, in_flight)
        return await common.run_concurrent(one, n, in_flight)

    result: dict[str, Any] = await _with_dbos(system, body)
    return result


async def w2_seq(system: str, n: int, warmup: int) -> dict[str, Any]:
    async def body(db: Database) -> dict[str, Any]:
        async def one() -> None:
            await booking(True)

        await common.run_expecting_failure(one, warmup, (CalendarRefused,))
        COMPENSATED.clear()
        took = await common.run_expecting_failure(one, n, (CalendarRefused,))
        expected = ["send_correction_sms", "refund_card", "release_slot"] * len(took)
        assert expected == COMPENSATED, "compensations did not run once each, in reverse"
        return common.latency_result(took, n)

    result: dict[str, Any] = await _with_dbos(system, body)
    return result


# --- W3 --------------------------------------------------------------------------------------


def w3(system: str, runs: int, folder: Path) -> dict[str, Any]:
    db = Database(system, folder)
    ledger = folder / "ledger.db"
    common.init_ledger(ledger)
    env = common.child_env(BENCH_LEDGER=str(ledger))
    cmd = [
        sys.executable,
        "-m",
        "bench.worker",
        "bench.peers.dbos_app",
        "w3-worker",
        "--system",
        system,
    ]
    cmd += ["--url", db.url, "--schema", db.schema or ""]
    try:
        # Create the system database (DBOS migrates at launch; its client does not), then
        # enqueue every saga before a worker runs, so that all 200 exist when it is killed.
        DBOS(config=db.config())
        DBOS.launch()
        DBOS.register_queue(W3_QUEUE, polling_interval_sec=0.05)
        DBOS.destroy(destroy_registry=False)
        client = DBOSClient(system_database_url=db.url, dbos_system_schema=db.schema or "dbos")
        for i in range(runs):
            options: EnqueueOptions = {
                "queue_name": W3_QUEUE,
                "workflow_name": w3_booking.__qualname__,
                "workflow_id": f"w3-{i:04d}",
            }
            client.enqueue(options)
        client.destroy()
        first = common.Gate(cmd, env, folder / "worker-1.log")
        second = common.Gate(cmd, env, folder / "worker-2.log")
        first.go()
        at_kill = common.kill_when_effects(ledger, runs * len(common.STEP_NAMES) // 2, first)
        t0 = time.perf_counter()
        second.go()
        deadline = time.monotonic() + 300
        while db.count("SUCCESS") < runs:
            if time.monotonic() > deadline:
                raise RuntimeError("W3 workflows did not all finish within 300 s")
            time.sleep(0.005)
        recovery = time.perf_counter() - t0
        second.stop()
        statuses = {s: db.count(s) for s in ("SUCCESS", "ERROR", "PENDING", "ENQUEUED")}
    finally:
        db.drop()
    summary = common.ledger_summary(ledger, runs)
    return {
        "recovery_s": recovery,
        "effects_at_kill": at_kill,
        "completed": statuses["SUCCESS"],
        "statuses": statuses,
        "ended_exactly_once": statuses["SUCCESS"] == runs and summary["missing_effects"] == 0,
        "lease": "none: a restarted DBOS process with the same executor id ('local') recovers "
        "its PENDING workflows when it launches",
        **summary,
    }


async def _w3_work(system: str, url: str, schema: str) -> None:
    common.gate_wait()
    config: DBOSConfig = {"name": "bench", "system_database_url": url, "log_level": "WARNING"}
    if schema:
        config["dbos_system_schema"] = schema
    DBOS(config=config)
    DBOS.launch()  # recovers this executor's pending workflows, then serves the queue
    await asyncio.to_thread(common.wait_for_stdin_close)
    DBOS.destroy(destroy_registry=False)


# --- Scale -----------------------------------------------------------------------------------


async def scale(system: str, marks: list[int], wakeups: int, park_limit: float) -> dict[str, Any]:
    async def body(db: Database) -> dict[str, Any]:
        async def start(workflow_id: str) -> None:
            with SetWorkflowID(workflow_id):
                await DBOS.start_workflow_async(parked)

        async def count() -> int:
            # A workflow is parked once its prepare step is recorded (it then sits in recv).
            return await asyncio.to_thread(_prepared, db)

        async def wake(workflow_id: str) -> float:
            await DBOS.send_async(workflow_id, "go", topic="wake")
            handle = await DBOS.retrieve_workflow_async(workflow_id)
            woke: float = await handle.get_result()
            return woke

        result = await common.park_then_wake(
            start, count, wake, marks=marks, wakeups=wakeups, park_limit=park_limit
        )
        return {
            **result,
            "rss_of": "the one process that starts, parks, signals and executes the workflows",
        }

    result: dict[str, Any] = await _with_dbos(system, body)
    return result


def _prepared(db: Database) -> int:
    sql = "SELECT count(*) FROM operation_outputs WHERE function_name LIKE '%prepare'"
    if db.schema is None:
        conn = sqlite3.connect(db.path, timeout=30)
        try:
            return int(conn.execute(sql).fetchone()[0])
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{db.schema}"')
        row = conn.execute(sql).fetchone()
        return int(row[0]) if row else 0


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["w3-worker"])
    parser.add_argument("--system", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--schema", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("BENCH_LEDGER", "")
    asyncio.run(_w3_work(args.system, args.url, args.schema))
