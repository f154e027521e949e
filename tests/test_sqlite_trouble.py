"""A SQLite file in trouble (read-only, full, corrupted) gets a message that names the cause.

- Read-only: as a normal user the file is made read-only with ``chmod``; as root (which
  ignores file modes) the command runs in a user namespace in which the file's owner is not
  mapped, so the kernel applies the mode to it (``unshare -r``); without either it skips.
- Disk full: a small filesystem needs root. SQLite's ``max_page_count`` pragma makes the file
  refuse to grow with the very error a full disk gives (``SQLITE_FULL``), through the same
  code path, so the test sets it on the store's connections once the run has started.
- Corrupted: pages in the middle of the file are overwritten, as a bad disk or a copy made
  while a writer ran would leave them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import storno
from storno._store import _sqlite, _sqlite_connection
from storno.testing import VirtualClock

ENV = {k: v for k, v in os.environ.items() if not k.startswith("STORNO_")}
pytestmark = pytest.mark.sqlite_only


def storno_cli(*args: str, cwd: Path, prefix: list[str] | None = None) -> Any:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "storno", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def demo_db(folder: Path) -> Path:
    path = folder / "runs.db"
    done = storno_cli("demo", "--db", f"sqlite:///{path}", cwd=folder)
    assert done.returncode == 0, done.stderr
    return path


def read_only(path: Path) -> list[str]:
    """Make ``path`` read-only for the command; the prefix that runs the command so."""
    path.chmod(0o444)
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None:
        pytest.skip("root ignores file modes and there is no unshare(1) to drop that")
    os.chown(path, 54321, 54321)  # an owner the namespace below does not map
    probe = subprocess.run(["unshare", "-r", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"root ignores file modes and unshare -r fails: {probe.stderr!r}")
    return ["unshare", "-r"]


def test_a_read_only_file_is_named_as_read_only(tmp_path: Path) -> None:
    path = demo_db(tmp_path)
    prefix = read_only(path)

    listed = storno_cli("list", "--db", f"sqlite:///{path}", cwd=tmp_path, prefix=prefix)
    assert listed.returncode == 0, listed.stderr  # reading it works
    done = storno_cli("demo", "--db", f"sqlite:///{path}", cwd=tmp_path, prefix=prefix)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert f"the SQLite database {str(path)!r} is read-only" in done.stderr


def test_db_status_reports_a_corrupted_file(tmp_path: Path) -> None:
    path = demo_db(tmp_path)
    storno_cli("demo", "--db", f"sqlite:///{path}", cwd=tmp_path)
    with sqlite3.connect(path) as conn:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert pages > 8
    with path.open("r+b") as file:  # the version table (page 2) stays readable
        file.seek(page * (pages // 2))
        file.write(b"\xff" * page * 2)

    done = storno_cli("db", "status", "--db", f"sqlite:///{path}", cwd=tmp_path)

    assert done.returncode == 1, done.stdout
    assert "up to date" not in done.stdout
    assert f"the SQLite database {str(path)!r} is corrupted" in done.stderr
    assert "restore it from a backup" in done.stderr


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[sqlite3.Connection]:
    """Every connection the SQLite store opens from now on."""
    opened: list[sqlite3.Connection] = []
    connect = _sqlite_connection.connect

    def recording(path: Path, synchronous: str) -> sqlite3.Connection:
        conn = connect(path, synchronous)
        opened.append(conn)
        return conn

    monkeypatch.setattr(_sqlite_connection, "connect", recording)
    monkeypatch.setattr(_sqlite, "connect", recording)
    return opened


GATE: dict[str, asyncio.Event] = {}


@storno.step(kind="retryable")
async def bulky(ctx: storno.StepContext, n: int) -> str:
    await GATE["open"].wait()
    return "x" * 4000  # the result needs new pages


@storno.saga
async def filling(ctx: storno.SagaContext) -> str:
    for n in range(10):
        await ctx.step(bulky, n)
    return "done"


async def test_a_full_disk_is_named_as_such(
    tmp_path: Path, connections: list[sqlite3.Connection], caplog: pytest.LogCaptureFixture
) -> None:
    GATE["open"] = asyncio.Event()
    url = f"sqlite:///{tmp_path / 'full.db'}"
    async with storno.Storno(url, sagas=[filling]) as app, app.worker():
        handle = await app.start(filling)
        for conn in connections:  # the file may not grow any more: a full disk
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
        with caplog.at_level(logging.WARNING):
            GATE["open"].set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while "write failed" not in caplog.text:
                assert loop.time() < deadline, "no write failed"
                await asyncio.sleep(0.02)
        for conn in connections:
            conn.execute("PRAGMA max_page_count = 1073741823")
        assert await handle.result(timeout=30) == "done"  # it resumes once there is room
    failed = [r.getMessage() for r in caplog.records if "write failed" in r.getMessage()]
    assert (
        f"the disk holding the SQLite database {str(tmp_path / 'full.db')!r} is full" in (failed[0])
    )
    assert "cannot rollback" not in caplog.text


@storno.step(kind="retryable")
async def slow(ctx: storno.StepContext) -> str:
    await GATE["open"].wait()
    return "ok"


@storno.saga
async def patient(ctx: storno.SagaContext) -> str:
    return await ctx.step(slow)


async def test_a_lapsed_lease_is_not_taken_over_by_its_own_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose lease renewals failed (a full disk) while it still executed a run must
    not claim that run a second time and then report its own lease as lost to another
    worker. The virtual clock lets the lease lapse without the heartbeat's help."""
    GATE["open"] = asyncio.Event()
    clock = VirtualClock()
    url = f"sqlite:///{tmp_path / 'lapsed.db'}"
    app = storno.Storno(url, sagas=[patient], clock=clock, lease_seconds=30)
    async with app, app.worker(poll_interval=0.01) as worker:
        handle = await app.start(patient)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while handle.run_id not in worker.active_runs:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        clock.advance(120)  # the lease has lapsed; no other worker exists
        with caplog.at_level(logging.WARNING):
            for _ in range(20):  # let the worker poll, and claim if it would
                app.wake_workers()
                await asyncio.sleep(0.01)
            GATE["open"].set()
            assert await handle.result(timeout=10) == "ok"
        info = await handle.describe()
    assert "another worker" not in caplog.text
    assert [e.type for e in info.history].count("run_resumed") == 0
