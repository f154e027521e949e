"""What every system's adapter shares: the workloads' constants, the provider's ledger for W3,
percentiles, memory readings, PostgreSQL schemas, and the child process's result line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

ROOT = Path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT_MARK = "BENCH-RESULT "
"""A child process prints its result as one line starting with this, then JSON."""

# --- the saga every system runs -------------------------------------------------------------

STEP_NAMES = ("book_slot", "charge_card", "send_sms", "sync_calendar")
STEP_RESULTS = {"book_slot": "slot", "charge_card": "charge", "send_sms": "sms"}
STEP_RESULTS["sync_calendar"] = "calendar"
COMPENSATIONS = {
    "book_slot": "release_slot",
    "charge_card": "refund_card",
    "send_sms": "send_correction_sms",
}
"""W2: step 4 (sync_calendar) fails terminally; these run for steps 3, 2, 1, in that order."""

W2_ERROR = "calendar refused the booking"
W3_STEP_SECONDS = 0.020
"""W3: each step takes this long; its effect lands at the half."""

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pg_url() -> str:
    return os.environ.get("STORNO_BENCH_POSTGRES_URL") or os.environ.get(
        "STORNO_TEST_POSTGRES_URL", DEFAULT_PG_URL
    )


def with_query(url: str, **options: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in options]
    query += list(options.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def plain_pg(url: str) -> str:
    """The URL without storno's own options, for psycopg or SQLAlchemy."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("schema", "pool_size")]
    return urlunsplit(parts._replace(query=urlencode(query)))


def pg_execute(sql: str, url: str | None = None) -> None:
    import psycopg

    with psycopg.connect(plain_pg(url or pg_url()), autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def run_tag() -> str:
    """Names the suite run; every schema a round creates carries it, so the harness can drop
    whatever a killed round left behind."""
    return os.environ.get("BENCH_RUN_TAG", "adhoc")


def fresh_name(prefix: str) -> str:
    return f"{prefix}_{run_tag()}_{os.getpid()}_{int(time.time() * 1000) % 10**6}"


def drop_tagged_schemas(tag: str) -> list[str]:
    """Drop the PostgreSQL schemas named with this run tag; return their names."""
    import psycopg

    with psycopg.connect(plain_pg(pg_url()), autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
            (f"bench\\_%\\_{tag}\\_%",),
        ).fetchall()
        for (name,) in rows:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')  # type: ignore[arg-type]
    return [name for (name,) in rows]


# --- measuring ------------------------------------------------------------------------------


def percentiles_ms(values: Sequence[float]) -> dict[str, float]:
    """Median, p99 and mean of durations in seconds, in milliseconds."""
    if len(values) < 2:
        v = values[0] * 1000 if values else float("nan")
        return {"p50_ms": v, "p99_ms": v, "mean_ms": v, "max_ms": v, "n": len(values)}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50_ms": statistics.median(values) * 1000,
        "p99_ms": cuts[98] * 1000,
        "mean_ms": statistics.fmean(values) * 1000,
        "max_ms": max(values) * 1000,
        "n": len(values),
    }


def latency_result(values: Sequence[float], asked: int) -> dict[str, Any]:
    return {**percentiles_ms(values), "capped": len(values) < asked}


def rss_mib(pid: int | None = None) -> float:
    """Resident memory (VmRSS) of a process in MiB; this process after a full collection."""
    if pid is None:
        import gc

        gc.collect()
    status = Path(f"/proc/{pid or 'self'}/status")
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mib(pid: int) -> float:
    """VmRSS of a process and all its descendants, in MiB."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            total += rss_mib(current)
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pending.extend(int(c) for c in children)
    return total


TIME_CAP = float(os.environ.get("BENCH_TIME_CAP", "0") or 0)
"""Seconds after which a measurement stops starting sagas (0: none). A slow system then runs
fewer sagas than asked; the result says how many (``n``) and that it was capped."""


def _capped(t0: float) -> bool:
    return TIME_CAP > 0 and time.perf_counter() - t0 > TIME_CAP


async def run_sequential(call: Any, n: int) -> list[float]:
    """Seconds each of ``n`` sagas took, one after another; ``call()`` runs one saga."""
    took: list[float] = []
    start = time.perf_counter()
    for _ in range(n):
        if took and _capped(start):
            break
        t0 = time.perf_counter()
        await call()
        took.append(time.perf_counter() - t0)
    return took


async def run_concurrent(call: Any, n: int, in_flight: int) -> dict[str, Any]:
    """Sagas per second for ``n`` sagas, ``in_flight`` at a time (``in_flight`` clients)."""
    remaining = n
    done = 0
    start = time.perf_counter()

    async def client() -> None:
        nonlocal remaining, done
        while remaining > 0 and not _capped(start):
            remaining -= 1
            await call()
            done += 1

    await asyncio.gather(*(client() for _ in range(in_flight)))
    return {"sagas_per_s": done / (time.perf_counter() - start), "n": done, "capped": done < n}


async def run_expecting_failure(
    call: Any, n: int, errors: tuple[type[BaseException], ...]
) -> list[float]:
    """W2: like run_sequential, but each saga must fail with one of ``errors``."""
    took: list[float] = []
    start = time.perf_counter()
    for _ in range(n):
        if took and _capped(start):
            break
        t0 = time.perf_counter()
        try:
            await call()
        except errors:
            took.append(time.perf_counter() - t0)
        else:
            raise AssertionError("a W2 saga completed; step 4 should have failed it")
    return took


# --- the provider's ledger (W3) and the compensation log (W2) ------------------------------

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    step   TEXT NOT NULL,
    key    TEXT NOT NULL,
    pid    INTEGER NOT NULL,
    at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS effects (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    key    TEXT NOT NULL UNIQUE,
    run_id TEXT NOT NULL,
    step   TEXT NOT NULL,
    pid    INTEGER NOT NULL,
    at     REAL NOT NULL
);
"""

_ledger: sqlite3.Connection | None = None


def ledger_path() -> str:
    path = os.environ.get("BENCH_LEDGER")
    if not path:
        raise RuntimeError("BENCH_LEDGER is not set: the W3 steps do not know their provider")
    return path


def _connect_ledger(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA synchronous=OFF")  # the provider's own durability is not measured
    return conn


def init_ledger(path: str | os.PathLike[str]) -> None:
    conn = _connect_ledger(str(path))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(LEDGER_SCHEMA)
    conn.close()


def _conn() -> sqlite3.Connection:
    global _ledger
    if _ledger is None:
        _ledger = _connect_ledger(ledger_path())
    return _ledger


async def provider_call(run_id: str, step: str, key: str) -> str:
    """A W3 step body: the call reaches the provider, which applies its effect once per
    idempotency key halfway through; the answer comes back after the other half."""
    conn = _conn()
    conn.execute(
        "INSERT INTO calls (run_id, step, key, pid, at) VALUES (?, ?, ?, ?, ?)",
        (run_id, step, key, os.getpid(), time.time()),
    )
    await asyncio.sleep(W3_STEP_SECONDS / 2)
    conn.execute(
        "INSERT INTO effects (key, run_id, step, pid, at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (key) DO NOTHING",
        (key, run_id, step, os.getpid(), time.time()),
    )
    await asyncio.sleep(W3_STEP_SECONDS / 2)
    return STEP_RESULTS[step]


def ledger_effects(path: str | os.PathLike[str]) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM effects").fetchone()[0])
    finally:
        conn.close()


def ledger_summary(path: str | os.PathLike[str], runs: int) -> dict[str, Any]:
    """What the provider saw: step bodies run more than once (calls per run and step), effects
    applied twice under different keys (a duplicate a provider cannot catch), and effects
    missing (a step of a finished saga the provider never applied)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        calls = conn.execute(
            "SELECT count(*) FROM (SELECT run_id, step FROM calls GROUP BY run_id, step"
            " HAVING count(*) > 1)"
        ).fetchone()[0]
        extra_calls = conn.execute(
            "SELECT coalesce(sum(c - 1), 0) FROM (SELECT count(*) AS c FROM calls"
            " GROUP BY run_id, step)"
        ).fetchone()[0]
        duplicated = conn.execute(
            "SELECT coalesce(sum(c - 1), 0) FROM (SELECT count(*) AS c FROM effects"
            " GROUP BY run_id, step)"
        ).fetchone()[0]
        applied = conn.execute(
            "SELECT count(*) FROM (SELECT DISTINCT run_id, step FROM effects)"
        ).fetchone()[0]
        repeated_keys = conn.execute(
            "SELECT count(*) FROM (SELECT key FROM calls GROUP BY key HAVING count(*) > 1)"
        ).fetchone()[0]
    finally:
        conn.close()
    return {
        "steps_run_twice": int(calls),
        "extra_step_bodies": int(extra_calls),
        "duplicated_effects": int(duplicated),
        "missing_effects": runs * len(STEP_NAMES) - int(applied),
        "calls_deduplicated_by_key": int(repeated_keys),
    }


# --- processes and ports --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Terminate a process we started, and kill it if it does not go."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Gate:
    """A worker subprocess that imports everything, says "ready", and starts only on "go": a
    replacement worker is made ready before the old one is killed, so the measured recovery
    does not include the interpreter's start-up."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
            cwd=ROOT,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"worker {cmd!r} did not start (said {line!r}); see {log}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop_now(self) -> None:
        """Terminate a worker that serves until told otherwise (a server, not a gate)."""
        stop_process(self.proc)
        self._log_file.close()

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


def gate_wait() -> None:
    """In a worker subprocess: say ready, then block until the driver says go."""
    print("ready", flush=True)
    sys.stdin.readline()


def wait_for_stdin_close() -> None:
    """In a worker subprocess: block until the driver closes our stdin (its stop signal)."""
    sys.stdin.read()


def kill_when_effects(ledger: Path, target: int, victim: Gate, timeout: float = 120.0) -> int:
    """SIGKILL ``victim`` as soon as the ledger holds ``target`` effects; return the count the
    provider held at that moment."""
    deadline = time.monotonic() + timeout
    while True:
        count = ledger_effects(ledger)
        if count >= target:
            victim.kill()
            return ledger_effects(ledger)
        if victim.proc.poll() is not None:
            raise RuntimeError(
                f"the worker exited ({victim.proc.returncode}) before {target} effects were in"
                f" ({count}); see {victim.log}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count} of {target} effects after {timeout:.0f} s")
        time.sleep(0.001)


def emit(result: dict[str, Any]) -> None:
    print(RESULT_MARK + json.dumps(result), flush=True)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


async def park_then_wake(
    start: Callable[[str], Awaitable[Any]],
    parked: Callable[[], Awaitable[int]],
    wake: Callable[[str], Awaitable[float]],
    *,
    marks: list[int],
    wakeups: int,
    park_limit: float,
    rss: Callable[[], float] = lambda: rss_mib(),
    server_rss: Callable[[], float] | None = None,
    poll: float = 0.2,
) -> dict[str, Any]:
    """The scale workload, the same for every system.

    Starts runs ``p-0000000``, ``p-0000001``, ... from 64 clients until each mark (or until
    ``park_limit`` seconds have passed), waits until ``parked()`` counts them all, and reads
    memory there; then wakes a random sample one at a time: ``wake(run_id)`` signals a run and
    returns the time (``time.time()``) its next step started.
    """
    import random

    total = 0
    phases: list[dict[str, Any]] = []
    stop_at = time.monotonic() + park_limit
    rss_empty = rss()
    for mark in marks:
        t0 = time.perf_counter()
        next_number = total

        async def client(last: int = mark) -> None:
            nonlocal next_number
            while next_number < last and time.monotonic() < stop_at:
                number = next_number
                next_number += 1
                await start(f"p-{number:07d}")

        await asyncio.gather(*(client() for _ in range(64)))
        started = next_number
        while (done := await parked()) < started:
            if time.monotonic() > stop_at + 600:
                raise RuntimeError(f"only {done} of {started} parked")
            await asyncio.sleep(poll)
        seconds = time.perf_counter() - t0
        phase = {
            "parked": started,
            "seconds": seconds,
            "runs_per_s": (started - total) / seconds,
            "rss_mib": rss(),
        }
        if server_rss is not None:
            phase["server_rss_mib"] = server_rss()
        phases.append(phase)
        total = started
        print(f"  {total} parked, {phase}", file=sys.stderr)
        if total < mark:
            break
    latencies = []
    for number in random.Random(1).sample(range(total), min(wakeups, total)):
        t0 = time.time()
        latencies.append(await wake(f"p-{number:07d}") - t0)
    result = {
        "rss_mib_empty": rss_empty,
        "phases": phases,
        "parked": total,
        "wake": percentiles_ms(latencies),
        "rss_mib_after": rss(),
    }
    if server_rss is not None:
        result["server_rss_mib_after"] = server_rss()
    return result
