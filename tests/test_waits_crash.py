"""A sleeping run survives SIGKILL of its process and wakes on time in a fresh one."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

APP = textwrap.dedent(
    """
    import asyncio, sys, time
    import storno

    @storno.step(kind="retryable")
    def stamp(ctx: storno.StepContext, label: str) -> float:
        return time.time()

    @storno.saga
    async def sleeper(ctx: storno.SagaContext) -> float:
        await ctx.step(stamp, "before")
        await ctx.sleep(1.5)
        return await ctx.step(stamp, "after")

    async def main(url: str, start: bool) -> None:
        async with storno.Storno(url, sagas=[sleeper]) as app, app.worker(poll_interval=0.05):
            if start:
                await app.start(sleeper.options(run_id="sleepy"))
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2] == "start"))
    """
)


def _status(db: Path) -> str | None:
    if not db.exists():
        return None
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT status FROM storno_runs WHERE run_id = 'sleepy'").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return row[0] if row else None


def _until(db: Path, wanted: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _status(db) != wanted:
        assert time.monotonic() < deadline, f"run not {wanted} within {timeout}s: {_status(db)}"
        time.sleep(0.02)


@pytest.mark.slow
def test_sleeping_run_wakes_on_time_after_its_process_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "sleeper_app.py"
    script.write_text(APP)
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    first = subprocess.Popen([sys.executable, str(script), url, "start"], env=env)
    try:
        _until(db, "waiting", timeout=20)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    second = subprocess.Popen([sys.executable, str(script), url, "work"], env=env)
    try:
        _until(db, "completed", timeout=20)
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait()
    conn = sqlite3.connect(db)
    events = {
        kind: (at, json.loads(data))
        for kind, at, data in conn.execute(
            "SELECT type, at, data FROM storno_events WHERE run_id = 'sleepy' ORDER BY seq"
        )
    }
    conn.close()
    until = events["timer_started"][1]["until"]
    fired = events["timer_fired"][0]
    assert until <= fired < until + 1.0, (until, fired)
