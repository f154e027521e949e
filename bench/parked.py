"""Many runs parked in a signal wait on SQLite: worker memory, and how fast one wakes up.

Each run calls one trivial step, waits for the signal "wake", then calls a step that notes
the time its body starts. One process with one worker (concurrency 64) parks the runs on a
fresh SQLite file, started by 64 concurrent clients, and reads its resident memory (VmRSS,
after gc.collect()) with 1,000 runs parked and with all N parked: a parked run is `waiting`
in the database and should hold no task or memory in the worker. Then it wakes randomly
chosen runs one at a time (each woken run finishes before the next signal) and measures, for
each, the time from sending the signal to the body of the run's next step starting. It also
reports RSS after the wake-ups and the size of the SQLite file. Nothing here is asserted.

    python bench/parked.py [--parked 100000] [--wakeups 1000] [--synchronous full|normal]
        [--in-flight 64] [--concurrency 64] [--park-limit 1800] [--seed 1] [--json]
    python bench/parked.py --quick    # smoke run: 1,000 and 10,000 parked, 200 wake-ups

Progress goes to stderr; the results (a table, or JSON with --json) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import storno

FIRST_MARK = 1_000
"""The first memory reading is taken with this many runs parked."""

woke_at: dict[str, float] = {}
"""perf_counter() when the step after the wait began, by run id."""

arrivals: dict[str, asyncio.Event] = {}
"""Set by the step after the wait, for the run a wake-up is waiting on."""


@storno.step(kind="retryable")
async def prepare(ctx: storno.StepContext) -> str:
    return "ready"


@storno.step(kind="retryable")
async def note_wake(ctx: storno.StepContext) -> None:
    woke_at[ctx.run_id] = time.perf_counter()
    event = arrivals.get(ctx.run_id)
    if event is not None:
        event.set()


@storno.saga
async def parked(ctx: storno.SagaContext) -> str:
    await ctx.step(prepare)
    await ctx.wait_for_signal("wake")
    await ctx.step(note_wake)
    return "done"


def numbered_id(number: int) -> str:
    """Runs get ids from their number, so that no list of ids is held while they park."""
    return f"parked-{number:07d}"


def _proc_status_mib(field: str) -> float | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def _maxrss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mib() -> float:
    """The process's current resident memory (VmRSS) in MiB, after a full collection.

    Where there is no /proc, the peak so far stands in for it."""
    gc.collect()
    current = _proc_status_mib("VmRSS")
    return current if current is not None else _maxrss_mib()


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (VmHWM) in MiB. The kernel updates VmHWM
    lazily, so it can lag the current VmRSS by a little: the larger of the two is returned."""
    peak = _proc_status_mib("VmHWM")
    current = _proc_status_mib("VmRSS")
    if peak is None or current is None:
        return _maxrss_mib()
    return max(peak, current)


def count_waiting(path: Path) -> int:
    """Runs in `waiting`, read on a connection of its own that is closed straight after."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT COUNT(*) FROM storno_runs WHERE status = 'waiting'").fetchone()
        return int(row[0])
    finally:
        conn.close()


def file_mib(path: Path) -> float:
    return path.stat().st_size / (1024 * 1024) if path.exists() else 0.0


async def park(
    app: storno.Storno,
    db: Path,
    first: int,
    last: int,
    in_flight: int,
    stop_starting_at: float,
    settle_seconds: float = 600.0,
) -> tuple[int, float]:
    """Start runs number ``first`` up to ``last`` (excluded) from ``in_flight`` clients and
    wait until every run started so far is parked. Clients stop starting at
    ``stop_starting_at`` (perf_counter). Returns the number of runs started and the seconds
    it took."""
    next_number = first
    start = time.perf_counter()

    async def client() -> None:
        nonlocal next_number
        while next_number < last and time.perf_counter() < stop_starting_at:
            number = next_number
            next_number += 1
            await app.start(parked.options(run_id=numbered_id(number)))

    async def report_progress() -> None:
        while True:
            await asyncio.sleep(10)
            waiting = await asyncio.to_thread(count_waiting, db)
            elapsed = time.perf_counter() - start
            print(
                f"  ... {next_number} started, {waiting} parked, {elapsed:.0f} s, "
                f"RSS {rss_mib():.1f} MiB",
                file=sys.stderr,
            )

    progress = asyncio.create_task(report_progress())
    try:
        await asyncio.gather(*(client() for _ in range(in_flight)))
        give_up = time.perf_counter() + settle_seconds
        while (waiting := await asyncio.to_thread(count_waiting, db)) < next_number:
            if time.perf_counter() > give_up:
                raise SystemExit(
                    f"only {waiting} of {next_number} runs parked after {settle_seconds:.0f} s"
                )
            await asyncio.sleep(0.2)
    finally:
        progress.cancel()
    return next_number - first, time.perf_counter() - start


async def wake_one(app: storno.Storno, run_id: str, timeout: float = 60.0) -> tuple[float, float]:
    """Signal one parked run; return (seconds until signal() returned, seconds until the body
    of its next step started). Waits for the run to finish before returning."""
    arrived = asyncio.Event()
    arrivals[run_id] = arrived
    t0 = time.perf_counter()
    await app.signal(run_id, "wake")
    sent = time.perf_counter() - t0
    await asyncio.wait_for(arrived.wait(), timeout)
    latency = woke_at[run_id] - t0
    del arrivals[run_id]
    await app.get_handle(run_id).result(timeout=timeout)
    return sent, latency


def percentiles_ms(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "median": statistics.median(values) * 1000,
        "p90": cuts[89] * 1000,
        "p99": cuts[98] * 1000,
        "max": max(values) * 1000,
    }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }


async def measure(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    db = folder / "storno.db"
    url = f"sqlite:///{db}?synchronous={args.synchronous}"
    total = 0  # runs started (and parked) so far, numbered 0 .. total - 1
    phases: list[dict[str, Any]] = []
    async with (
        storno.Storno(url, sagas=[parked]) as app,
        app.worker(concurrency=args.concurrency) as worker,
    ):
        rss_empty = rss_mib()
        stop_starting_at = time.perf_counter() + args.park_limit
        for mark in (min(FIRST_MARK, args.parked), args.parked):
            if total >= mark:
                continue
            started, seconds = await park(app, db, total, mark, args.in_flight, stop_starting_at)
            total += started
            phases.append(
                {
                    "parked": total,
                    "seconds": seconds,
                    "runs_per_s": started / seconds,
                    "rss_mib": rss_mib(),
                    "worker_tasks": len(worker.active_runs),
                    "asyncio_tasks": len(asyncio.all_tasks()),
                }
            )
            print(
                f"  {total} parked in {seconds:.1f} s, RSS {phases[-1]['rss_mib']:.1f} MiB",
                file=sys.stderr,
            )
            if total < mark:
                print(f"  stopped starting after {args.park_limit:.0f} s", file=sys.stderr)
                break

        chosen = random.Random(args.seed).sample(range(total), min(args.wakeups, total))
        sent: list[float] = []
        latencies: list[float] = []
        wake_start = time.perf_counter()
        for number in chosen:
            took_to_send, latency = await wake_one(app, numbered_id(number))
            sent.append(took_to_send)
            latencies.append(latency)
        wake_seconds = time.perf_counter() - wake_start
        rss_after = rss_mib()
        peak = peak_rss_mib()
        db_mib, wal_mib = file_mib(db), file_mib(folder / "storno.db-wal")
    return {
        "machine": machine(),
        "synchronous": args.synchronous,
        "in_flight": args.in_flight,
        "concurrency": args.concurrency,
        "rss_mib_empty": rss_empty,
        "phases": phases,
        "parked": total,
        "park_seconds": sum(p["seconds"] for p in phases),
        "park_runs_per_s": total / sum(p["seconds"] for p in phases),
        "wakeups": len(latencies),
        "wakeup_seconds": wake_seconds,
        "signal_to_step_ms": percentiles_ms(latencies),
        "signal_call_ms": percentiles_ms(sent),
        "rss_mib_after_wakeups": rss_after,
        "peak_rss_mib": peak,
        "db_file_mib": db_mib,
        "wal_file_mib": wal_mib,
    }


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(
        f"{m['cpus']} CPUs, Python {m['python']}, SQLite {m['sqlite']}, {m['platform']}; "
        f"synchronous={result['synchronous']}, {result['in_flight']} clients, "
        f"worker concurrency {result['concurrency']}"
    )
    print()
    print(f"  {'parked':>8}  {'seconds':>8}  {'runs/s':>8}  {'RSS MiB':>8}  {'worker tasks':>12}")
    print(f"  {0:8d}  {'':>8}  {'':>8}  {result['rss_mib_empty']:8.1f}  {'':>12}")
    for p in result["phases"]:
        print(
            f"  {p['parked']:8d}  {p['seconds']:8.1f}  {p['runs_per_s']:8.0f}  "
            f"{p['rss_mib']:8.1f}  {p['worker_tasks']:12d}"
        )
    print(
        f"  parking overall: {result['parked']} runs in {result['park_seconds']:.1f} s, "
        f"{result['park_runs_per_s']:.0f} runs/s"
    )
    if len(result["phases"]) == 2:
        first, last = result["phases"]
        growth = last["rss_mib"] - first["rss_mib"]
        per_run = growth * 1024 * 1024 / (last["parked"] - first["parked"])
        print(
            f"  RSS growth from {first['parked']} to {last['parked']} parked: "
            f"{growth:.1f} MiB ({per_run:.0f} bytes per parked run)"
        )
    print()
    print(f"  {result['wakeups']} wake-ups, one at a time ({result['wakeup_seconds']:.1f} s)")
    print(f"  {'ms':24s} {'median':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for label, key in (
        ("signal -> next step", "signal_to_step_ms"),
        ("signal() call", "signal_call_ms"),
    ):
        q = result[key]
        print(f"  {label:24s} {q['median']:8.2f} {q['p90']:8.2f} {q['p99']:8.2f} {q['max']:8.2f}")
    print()
    print(f"  RSS after wake-ups       {result['rss_mib_after_wakeups']:8.1f} MiB")
    print(f"  peak RSS                 {result['peak_rss_mib']:8.1f} MiB")
    print(f"  SQLite file              {result['db_file_mib']:8.1f} MiB")
    print(f"  SQLite WAL file          {result['wal_file_mib']:8.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parked", type=int, default=100_000, help="runs to park in all")
    parser.add_argument("--wakeups", type=int, default=1_000)
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    parser.add_argument("--in-flight", type=int, default=64, help="concurrent starting clients")
    parser.add_argument("--concurrency", type=int, default=64, help="the worker's concurrency")
    parser.add_argument(
        "--park-limit",
        type=float,
        default=1800.0,
        help="stop starting runs after this many seconds and go on with those parked",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed for choosing runs to wake")
    parser.add_argument(
        "--quick", action="store_true", help="1,000 and 10,000 parked, 200 wake-ups"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.parked, args.wakeups = 10_000, 200
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(measure(Path(tmp), args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
