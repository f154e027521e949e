"""Two ``storno worker`` processes on one SQLite file: they share the runs, and when one is
SIGKILLed in the middle of its runs the other takes them over; nothing is done twice."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import storno

APP = """
import os
import time
from pathlib import Path

import storno

FOLDER = Path(os.environ["TWO_WORKERS_DIR"])


def note(line: str) -> None:
    with open(FOLDER / "calls.log", "a") as log:  # one write per line: O_APPEND keeps them whole
        log.write(f"{line} {os.getpid()}\\n")


@storno.step(kind="compensable", compensate=lambda ctx, n: None)
def charge(ctx: storno.StepContext, n: int) -> str:
    note(f"charge {ctx.idempotency_key}")
    return f"charged {n}"


@storno.step(kind="retryable")
def hold(ctx: storno.StepContext, n: int) -> str:
    note(f"hold {ctx.idempotency_key}")
    deadline = time.monotonic() + 60
    while not (FOLDER / "gate").exists():  # the test opens it once a worker was killed
        if time.monotonic() > deadline:
            raise storno.TerminalError("the gate never opened")
        time.sleep(0.02)
    return f"held {n}"


@storno.saga
async def paid(ctx: storno.SagaContext, n: int) -> str:
    await ctx.step(charge, n)
    return await ctx.step(hold, n)


app = storno.Storno(sagas=[paid], lease_seconds=2)
"""
RUNS = 6


def start_worker(folder: Path, url: str, worker_id: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORNO_")}
    env["TWO_WORKERS_DIR"] = str(folder)
    command = [sys.executable, "-m", "storno", "worker", "--app", "shared_app:app"]
    command += ["--db", url, "--worker-id", worker_id, "--concurrency", "4"]
    command += ["--poll-interval", "0.05"]
    with log.open("wb") as err:
        return subprocess.Popen(command, cwd=folder, env=env, stderr=err)


def wait_until(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.02)


def calls(folder: Path) -> list[tuple[str, str, int]]:
    path = folder / "calls.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(kind, key, int(pid)) for kind, key, pid in (line.split() for line in lines)]


@pytest.mark.slow
def test_two_workers_share_a_sqlite_file_and_one_takes_over_from_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shared_app.py").write_text(APP)
    monkeypatch.setenv("TWO_WORKERS_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("shared_app")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    storno_db = subprocess.run(
        [sys.executable, "-m", "storno", "db", "upgrade", "--db", url], capture_output=True
    )
    assert storno_db.returncode == 0, storno_db.stderr
    a = start_worker(tmp_path, url, "a", tmp_path / "a.log")
    b = start_worker(tmp_path, url, "b", tmp_path / "b.log")
    try:

        async def start() -> list[str]:
            async with storno.Storno(url, sagas=[module.paid]) as app:
                return [(await app.start(module.paid, n)).run_id for n in range(RUNS)]

        run_ids = asyncio.run(start())
        # Every run is held in its second step, split between the workers (4 slots each).
        wait_until(lambda: sum(k == "hold" for k, _, _ in calls(tmp_path)) == RUNS, "all held")
        held_by = {pid for kind, _, pid in calls(tmp_path) if kind == "hold"}
        assert held_by == {a.pid, b.pid}, "both workers should hold runs"

        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=10) == -signal.SIGKILL
        (tmp_path / "gate").touch()

        async def results() -> tuple[list[str], list[storno.RunInfo]]:
            async with storno.Storno(url, sagas=[module.paid]) as app:
                done = [await app.get_handle(r).result(timeout=30) for r in run_ids]
                return done, [await app.describe(r) for r in run_ids]

        done, infos = asyncio.run(results())
    finally:
        for worker in (a, b):
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in (a, b):
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    assert done == [f"held {n}" for n in range(RUNS)]
    assert b.returncode == 0, (tmp_path / "b.log").read_text()
    log = calls(tmp_path)
    charges = [key for kind, key, _ in log if kind == "charge"]
    assert len(charges) == RUNS == len(set(charges))  # each charge made once, never repeated
    taken_over = {key for kind, key, pid in log if kind == "hold" and pid == a.pid}
    assert taken_over, "the killed worker held none of the runs"
    for key in taken_over:  # B called the held step again, under the same key
        assert ("hold", key, b.pid) in log
    resumed = [i for i in infos if any(e.type == "run_resumed" for e in i.history)]
    assert len(resumed) == len(taken_over)
    assert all(i.status is storno.RunStatus.COMPLETED for i in infos)
