"""Runs per second of a 4-step saga on PostgreSQL with 1, 2 and 4 worker processes.

Each round gets a fresh schema. The runs are created first (no worker is claiming yet); then
every worker process is told to start at once, and the clock runs until the last run has
completed. Worker processes are started and connected before the clock starts, so process
start-up is not counted. Prints the median of the rounds for each worker count; nothing here
is asserted.

    python bench/postgres_throughput.py [--url postgresql://postgres@127.0.0.1:5432/test]
        [--runs 2000] [--rounds 3] [--workers 1,2,4] [--concurrency 32] [--json]

The URL defaults to $STORNO_TEST_POSTGRES_URL, then to the local server above.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

import storno

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


@storno.step(kind="retryable")
async def book_slot(ctx: storno.StepContext) -> str:
    return "slot"


@storno.step(kind="retryable")
async def charge_card(ctx: storno.StepContext) -> str:
    return "charge"


@storno.step(kind="retryable")
async def send_sms(ctx: storno.StepContext) -> str:
    return "sms"


@storno.step(kind="retryable")
async def sync_calendar(ctx: storno.StepContext) -> str:
    return "calendar"


@storno.saga
async def booking(ctx: storno.SagaContext, n: int) -> str:
    for step in (book_slot, charge_card, send_sms, sync_calendar):
        await ctx.step(step)
    return "done"


def _with(url: str, **options: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in options]
    query += list(options.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _plain(url: str) -> str:
    """The URL without storno's own options, for psycopg."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("schema", "pool_size")]
    return urlunsplit(parts._replace(query=urlencode(query)))


# --- the worker process -----------------------------------------------------------------


async def work(url: str, concurrency: int) -> None:
    async with storno.Storno(url, sagas=[booking]) as app:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # "go"
        async with app.worker(concurrency=concurrency, poll_interval=0.05) as worker:
            app.store.subscribe(worker.wake)
            await asyncio.to_thread(sys.stdin.readline)  # "stop" (or EOF)


# --- the driver -------------------------------------------------------------------------


async def create_runs(url: str, count: int) -> None:
    async with storno.Storno(url, sagas=[booking]) as app:
        for start in range(0, count, 200):
            await asyncio.gather(*(app.start(booking, n) for n in range(start, start + 200)))


def one_round(base: str, workers: int, runs: int, concurrency: int) -> float:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    url = _with(base, schema=schema)
    with psycopg.connect(_plain(base), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    procs: list[subprocess.Popen[str]] = []
    try:
        asyncio.run(create_runs(url, runs))
        for _ in range(workers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", "--url", url],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "BENCH_CONCURRENCY": str(concurrency)},
                )
            )
        for proc in procs:
            line = proc.stdout.readline().strip() if proc.stdout is not None else ""
            if line != "ready":
                raise RuntimeError(f"a worker did not start (said {line!r})")
        with psycopg.connect(_plain(base), autocommit=True) as conn:
            started = time.perf_counter()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            deadline = started + 600
            while True:
                row = conn.execute(
                    f"SELECT count(*) FROM \"{schema}\".storno_runs WHERE status <> 'completed'"
                ).fetchone()
                if row is not None and row[0] == 0:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError("the runs did not complete within 10 minutes")
                time.sleep(0.005)
            elapsed = time.perf_counter() - started
    finally:
        for proc in procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with psycopg.connect(_plain(base), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return runs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("STORNO_TEST_POSTGRES_URL", DEFAULT_URL))
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--concurrency", type=int, default=32, help="runs in flight per worker")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(work(args.url, int(os.environ.get("BENCH_CONCURRENCY", "32"))))
        return
    counts = [int(n) for n in args.workers.split(",")]
    results: dict[int, list[float]] = {}
    for workers in counts:
        results[workers] = [
            one_round(args.url, workers, args.runs, args.concurrency) for _ in range(args.rounds)
        ]
    medians = {n: statistics.median(rates) for n, rates in results.items()}
    if args.json:
        print(json.dumps({"rounds": results, "median_runs_per_s": medians}, indent=2))
        return
    print(
        f"PostgreSQL, 4-step saga, {args.runs} runs, {args.concurrency} in flight per worker, "
        f"median of {args.rounds} rounds ({os.cpu_count()} CPUs)"
    )
    for workers, rate in medians.items():
        rounds = ", ".join(f"{r:.0f}" for r in results[workers])
        print(f"  {workers} worker process(es): {rate:8.0f} runs/s   (rounds: {rounds})")


if __name__ == "__main__":
    main()
