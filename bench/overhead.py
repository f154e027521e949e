"""Per-step overhead of a 4-step saga on SQLite, sequential and with 32 runs in flight.

Compared with the storage floor measured in the same process: single-row INSERTs, each its
own commit, into a WAL database at the same synchronous level. Prints medians of several
rounds; nothing here is asserted.

    python bench/overhead.py [--rounds 5] [--sequential 300] [--concurrent 2000]
        [--synchronous full|normal]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import storno


@storno.step(kind="retryable")
def book_slot(ctx: storno.StepContext) -> str:
    return "slot"


@storno.step(kind="retryable")
def charge_card(ctx: storno.StepContext) -> str:
    return "charge"


@storno.step(kind="retryable")
def send_sms(ctx: storno.StepContext) -> str:
    return "sms"


@storno.step(kind="retryable")
def sync_calendar(ctx: storno.StepContext) -> str:
    return "calendar"


@storno.saga
async def booking(ctx: storno.SagaContext) -> str:
    for step in (book_slot, charge_card, send_sms, sync_calendar):
        await ctx.step(step)
    return "done"


def raw_commit_floor(folder: Path, synchronous: str, n: int = 500) -> float:
    """Seconds per durable single-row commit, the cost every step must pay at least once."""
    conn = sqlite3.connect(folder / "floor.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    start = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (v) VALUES (?)", (f"row {i}",))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed / n


async def sequential(app: storno.Storno, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await app.run(booking)
    return (time.perf_counter() - start) / n


async def concurrent(app: storno.Storno, n: int, in_flight: int = 32) -> float:
    remaining = n

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await app.run(booking)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(in_flight)))
    return n / (time.perf_counter() - start)


async def one_round(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    url = f"sqlite:///{folder / 'storno.db'}?synchronous={args.synchronous}"
    async with storno.Storno(url, sagas=[booking]) as app, app.worker(concurrency=64):
        await sequential(app, 20)  # warm up
        c0, o0 = app.store.write_counts  # type: ignore[attr-defined]
        seq = await sequential(app, args.sequential)
        c1, o1 = app.store.write_counts  # type: ignore[attr-defined]
        rate = await concurrent(app, args.concurrent)
        c2, o2 = app.store.write_counts  # type: ignore[attr-defined]
    return {
        "seq_ms_per_saga": seq * 1000,
        "seq_commits_per_step": (c1 - c0) / (args.sequential * 4),
        "seq_writes_per_step": (o1 - o0) / (args.sequential * 4),
        "concurrent_sagas_per_s": rate,
        "concurrent_commits_per_step": (c2 - c1) / (args.concurrent * 4),
        "concurrent_writes_per_step": (o2 - o1) / (args.concurrent * 4),
        "floor_ms_per_commit": raw_commit_floor(folder, args.synchronous) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--concurrent", type=int, default=2000)
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            rounds.append(asyncio.run(one_round(Path(tmp), args)))
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    summary["seq_ms_per_step"] = summary["seq_ms_per_saga"] / 4
    summary["concurrent_ms_per_step"] = 1000 / summary["concurrent_sagas_per_s"] / 4
    summary["seq_step_vs_floor"] = summary["seq_ms_per_step"] / summary["floor_ms_per_commit"]
    if args.json:
        print(json.dumps({"rounds": rounds, "median": summary}, indent=2))
        return
    print(f"SQLite synchronous={args.synchronous}, medians of {args.rounds} rounds")
    for key, value in summary.items():
        print(f"  {key:30s} {value:10.3f}")


if __name__ == "__main__":
    main()
