"""Events from ``ctx.emit`` to a consumer's committed handling, through the outbox relay and
NATS JetStream, beside a naive "send after commit" on the same workload.

A producer process runs sagas that each emit ``--per-run`` events (keys spread over 64
aggregates); its worker's relay sends them. A consumer process (its own database) handles
each with an ``@storno.on`` handler that starts a run of a saga with no steps: the run's one
commit, which records the event's id as handled, is the handling. The naive baseline runs the
same sagas without ``ctx.emit`` and, once each run's commit is done, publishes its events
straight to NATS (an event is lost if the process dies between the two). Latency is from the
event's commit (the outbox row's time; the run's end for the naive send) to the consumer's
commit of its handling; throughput is events over the time from the first commit to the last
handling. Durability as everywhere: ``synchronous=FULL`` on SQLite, ``synchronous_commit=on``
on PostgreSQL.

    python -m bench.events [--backend sqlite|postgres|both] [--events 20000] [--per-run 50]
        [--rounds 3] [--nats nats://127.0.0.1:4222] [--postgres URL] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import storno
from storno.events import EventMessage, start

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "bench.tick"
KINDS = ("outbox", "naive", "outbox paced", "naive paced")
KEYS = int(os.environ.get("STORNO_BENCH_EVENT_KEYS", "64"))  # aggregates the events are about


@storno.saga
async def produce(ctx: storno.SagaContext, first: int, count: int, emit: bool) -> int:
    for n in range(first, first + count):
        if emit:
            ctx.emit(TOPIC, {"n": n}, key=f"k{n % KEYS}")
    return count


@storno.saga
async def handled(ctx: storno.SagaContext, n: int, emitted_at: float) -> int:
    return n


@storno.on(TOPIC, name="bench_consumer")
def consume_tick(event: EventMessage) -> Any:
    return start(handled, event.data["n"], event.emitted_at)


def _broker(nats: str, stream: str) -> Any:
    from storno.events.nats import NatsBroker

    return NatsBroker(nats, stream=stream, subject_prefix=f"{stream}.", batch=256)


# --- the consumer process ------------------------------------------------------------------


async def consumer(args: argparse.Namespace) -> None:
    expected = args.events
    times: list[tuple[float, float]] = []  # (emitted_at, handled_at)
    done = asyncio.Event()

    def listener(record: Any, events: list[Any]) -> None:
        if record.saga != "handled":
            return
        if any(e.type.value == "run_completed" for e in events):
            emitted = json.loads(record.input)["args"][1]
            times.append((emitted, time.time()))
            if len(times) >= expected:
                done.set()

    app = storno.Storno(
        args.db, sagas=[handled], handlers=[consume_tick], broker=_broker(args.nats, args.stream)
    )
    app.add_listener(listener)
    async with app, app.worker(concurrency=256, relay=False):
        print("ready", flush=True)
        await asyncio.wait_for(done.wait(), timeout=args.timeout)
    latencies = sorted(h - e for e, h in times)
    print(json.dumps({
        "handled": len(times),
        "first_handled": min(h for _, h in times),
        "last_handled": max(h for _, h in times),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
    }), flush=True)  # fmt: skip


# --- the producer (this process) -----------------------------------------------------------


async def produce_all(db: str, nats: str, stream: str, events: int, per_run: int, naive: bool,
                      rate: float | None = None) -> tuple[float, float, float]:  # fmt: skip
    """Start the runs 32 at a time (or one every ``per_run / rate`` seconds): when it began,
    and the seconds until every run's commit and until every event was confirmed sent."""
    broker = _broker(nats, stream)
    app = storno.Storno(db, sagas=[produce], broker=None if naive else broker)
    first_commit: list[float] = []
    async with app, app.worker(concurrency=64):
        if naive:
            await broker.connect()
        queue = list(range(0, events, per_run))
        sem = asyncio.Semaphore(32)

        async def one(first: int) -> None:
            async with sem:
                handle = await app.start(produce, first, min(per_run, events - first), not naive)
                await handle.result(timeout=300)
                committed = time.time()
                first_commit.append(committed)
                if naive:  # send after commit: lost if the process dies right here
                    messages = [
                        EventMessage(
                            event_id=f"{handle.run_id}/{n}",
                            topic=TOPIC,
                            payload=json.dumps({"n": n}),
                            key=f"k{n % KEYS}",
                            emitted_at=committed,
                        )
                        for n in range(first, min(first + per_run, events))
                    ]
                    results = await broker.publish(messages)
                    assert not any(results), results

        started = time.time()
        if rate is None:
            await asyncio.gather(*(one(f) for f in queue))
        else:
            tasks = []
            for i, f in enumerate(queue):
                await asyncio.sleep(max(started + i * per_run / rate - time.time(), 0))
                tasks.append(asyncio.ensure_future(one(f)))
            await asyncio.gather(*tasks)
        produced = time.time()
        # The worker's relay drains the outbox; its progress is only visible in the store.
        while not naive and (await app.store.outbox.stats()).pending:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        sent = time.time()
        if naive:
            await broker.close()
    return started, produced - started, sent - started


async def one_round(
    backend: str, args: argparse.Namespace, naive: bool, rate: float | None = None
) -> dict[str, Any]:
    stream = f"bench{uuid.uuid4().hex[:10]}"
    events = args.events if rate is None else args.latency_events
    per_run = args.per_run if rate is None else args.latency_per_run
    tmp = Path(tempfile.mkdtemp(prefix="storno-events-"))
    if backend == "sqlite":
        producer_db, consumer_db = f"sqlite:///{tmp}/producer.db", f"sqlite:///{tmp}/consumer.db"
    else:
        producer_db = _schema_url(args.postgres, f"bp_{stream}")
        consumer_db = _schema_url(args.postgres, f"bc_{stream}")
    import nats

    nc = await nats.connect(args.nats)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{stream}.>"], duplicate_window=120.0)
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once per round, outside the timing
        [sys.executable, "-m", "bench.events", "--consumer", "--db", consumer_db, "--nats",
         args.nats, "--stream", stream, "--events", str(events)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.strip() == "ready", line
        started, produced, sent = await produce_all(
            producer_db, args.nats, stream, events, per_run, naive, rate
        )
        out, _ = await asyncio.to_thread(proc.communicate, timeout=600)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
        await js.delete_stream(stream)
        await nc.close()
        if backend == "postgres":
            for url in (producer_db, consumer_db):
                _drop_schema(args.postgres, url.rsplit("schema=", 1)[1])
    elapsed = result["last_handled"] - started
    return {
        "emitted_per_s": events / produced,  # committed by the producer's runs
        "sent_per_s": events / sent,  # confirmed by the broker (the relay, or the naive send)
        "events_per_s": events / elapsed,  # handled by the consumer
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
    }


def _schema_url(base: str, schema: str) -> str:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}schema={schema}"


def _drop_schema(base: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def run(args: argparse.Namespace) -> dict[str, Any]:
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    report: dict[str, Any] = {"events": args.events, "per_run": args.per_run, "rounds": {}}
    for backend in backends:
        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        for r in range(args.rounds):  # interleaved, so that drift hits both alike
            for kind in KINDS:
                rate = args.latency_rate if kind.endswith("paced") else None
                result = await one_round(backend, args, naive=kind.startswith("naive"), rate=rate)
                rows[kind].append(result)
                print(f"{backend} {kind} round {r + 1}: {result}", file=sys.stderr)
        summary = {
            kind: {m: statistics.median(x[m] for x in results) for m in results[0]}
            for kind, results in rows.items()
        }
        summary["ratio_naive_over_outbox"] = (
            summary["naive"]["events_per_s"] / summary["outbox"]["events_per_s"]
        )
        report["rounds"][backend] = {"runs": rows, "median": summary}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--per-run", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-rate", type=float, default=200.0,
                        help="events/s of the paced phase that measures latency")  # fmt: skip
    parser.add_argument("--latency-events", type=int, default=2_000)
    parser.add_argument("--latency-per-run", type=int, default=5)
    parser.add_argument("--nats", default=os.environ.get("STORNO_BENCH_NATS_URL",
                                                         "nats://127.0.0.1:4222"))  # fmt: skip
    parser.add_argument("--postgres", default=os.environ.get(
        "STORNO_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="2,000 events, one round, SQLite")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--consumer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consumer:
        if os.environ.get("STORNO_BENCH_PROFILE"):  # pyinstrument's text report to stderr
            from pyinstrument import Profiler

            with Profiler(async_mode="disabled") as profiler:
                asyncio.run(consumer(args))
            print(profiler.output_text(unicode=False, show_all=False), file=sys.stderr)
            return
        asyncio.run(consumer(args))
        return
    if args.quick:
        args.events, args.rounds, args.backend = 2_000, 1, "sqlite"
        args.latency_events = 400
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for backend, data in report["rounds"].items():
        m = data["median"]
        for kind in KINDS:
            r = m[kind]
            print(
                f"{backend:8} {kind:12} sent {r['sent_per_s']:7.0f}/s  handled "
                f"{r['events_per_s']:7.0f}/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
            )
        print(f"{backend:8} naive/outbox throughput ratio {m['ratio_naive_over_outbox']:.2f}")


if __name__ == "__main__":
    main()
