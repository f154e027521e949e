"""The PostgreSQL store: URLs, work distribution with SKIP LOCKED, answers lost after a
commit, dropped connections, LISTEN/NOTIFY wake-ups, worker processes killed with SIGKILL,
and a server restart with runs in flight. The store contract is in tests/store/test_contract.py.

Worker processes run this file as a script (``python tests/test_postgres.py worker ...``);
they execute ``crash_app.booking``, whose steps keep the provider's ledger (see
``tests/crash_app.py``), and the verdict is the one ``tests/test_crash.py`` gives.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import crash_app
import storno
from conftest import pg_execute, wait_for
from storno._app import ENDED
from storno._model import Event, EventType, InboxMessage, Lease, MessageKind
from storno._store import NewRun, RunUpdate, Store, open_store
from test_crash import DEADLINE, SIGKILLED, Scenario, Worker

HERE = Path(__file__).resolve()
ACTIVE = (
    storno.RunStatus.PENDING,
    storno.RunStatus.RUNNING,
    storno.RunStatus.WAITING,
    storno.RunStatus.COMPENSATING,
)


def _schema(url: str) -> str:
    return url.rsplit("schema=", 1)[1].split("&", 1)[0]


def _event(seq: int, type: EventType = EventType.RUN_CREATED, at: float = 1.0) -> Event:
    return Event(seq, type, at, None, {"n": seq}, "{}" if seq == 0 else None)


async def _new_run(
    store: Store, run_id: str, saga: str = "alpha", *, wake_at: float | None = None
) -> None:
    await store.create_run(
        NewRun(run_id, saga, "{}", 1.0, None, _event(0), wake_at=wake_at),
        claim_for=None,
        lease_seconds=30,
    )


@pytest.fixture
async def store(db_url: str) -> Any:
    opened = open_store(db_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


# --- URLs and the driver (no server needed) ---------------------------------------------


def test_postgres_urls_are_parsed_and_checked() -> None:
    from storno._store._postgres import PostgresStore, parse_postgres_url

    conninfo, schema, pool = parse_postgres_url(
        "postgresql://u:pw@db.example:6543/app?schema=tenant_1&pool_size=4&sslmode=require"
    )
    assert (schema, pool) == ("tenant_1", 4)
    assert "schema" not in conninfo and "pool_size" not in conninfo
    assert "sslmode=require" in conninfo and "application_name=storno" in conninfo
    assert parse_postgres_url("postgres://localhost/x")[1:] == ("public", 10)
    assert isinstance(open_store("postgres://localhost/x"), PostgresStore)
    assert isinstance(open_store("postgresql://localhost/x"), PostgresStore)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://h/db?schema=Bad-Name", "schema='Bad-Name'"),
        ("postgresql://h/db?schema=", "schema=''"),
        ("postgresql://h/db?pool_size=0", "pool_size='0'"),
        ("postgresql://h/db?pool_size=many", "pool_size='many'"),
        ("postgresql://u:hunter2@h/db?colour=blue", 'invalid URI query parameter: "colour"'),
    ],
)
def test_bad_postgres_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(storno.ConfigurationError) as caught:
        open_store(url)
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value), "a password must never be shown"


def test_missing_driver_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("psycopg", "psycopg_pool"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import psycopg` fail
    for module in ("storno._store._postgres", "storno._store._postgres_connection"):
        monkeypatch.delitem(sys.modules, module, raising=False)  # imported anew, or never yet
    with pytest.raises(storno.ConfigurationError, match=r"pip install './storno\[postgres\]'"):
        storno.Storno("postgresql://localhost/test")


async def test_an_unreachable_server_is_a_store_error_after_bounded_retries() -> None:
    from storno._store._postgres import PostgresStore

    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test?connect_timeout=1")
    store.retry_attempts, store.retry_seconds = 3, 2.0
    started = time.monotonic()
    with pytest.raises(storno.StoreError, match="failed 3 times") as caught:
        await store.open()
    assert time.monotonic() - started < 10
    assert caught.value.__cause__ is not None


# --- work distribution ------------------------------------------------------------------


@pytest.mark.postgres
async def test_concurrent_claimers_never_get_the_same_run(pg_schema: str) -> None:
    stores = [open_store(pg_schema + "&pool_size=6") for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        total = 600
        for start in range(0, total, 100):
            await asyncio.gather(
                *(_new_run(stores[0], f"r{i:04d}") for i in range(start, start + 100))
            )
        claimed: list[tuple[str, str, int]] = []

        async def claimer(store: Store, name: str) -> None:
            empty = 0
            while empty < 3:
                got = await store.claim(
                    name, limit=1 + len(claimed) % 7, now=time.time(), lease_seconds=600
                )
                claimed.extend((r.run_id, lease.owner, lease.epoch) for r, lease in got)
                empty = 0 if got else empty + 1

        await asyncio.gather(
            *(claimer(stores[i % 4], f"worker-{i}") for i in range(24))  # 24 at once
        )
        runs = Counter(run_id for run_id, _, _ in claimed)
        assert sorted(runs) == [f"r{i:04d}" for i in range(total)]
        assert max(runs.values()) == 1, [r for r, n in runs.items() if n > 1][:10]
        assert {epoch for _, _, epoch in claimed} == {1}
        assert len({owner for _, owner, _ in claimed}) > 4, "the claimers did not overlap"
    finally:
        for s in stores:
            await s.close()


# --- answers lost after a commit --------------------------------------------------------


def _lose_first_answer(store: Store) -> list[str]:
    """Make the store's next operation commit, then lose its answer as a dropped connection
    would; the store's own retry then runs for real. Returns the operations it hit."""
    import psycopg

    original = store._retrying  # type: ignore[attr-defined]
    hit: list[str] = []

    async def retrying(what: str, fn: Any) -> Any:
        lost = not hit

        async def once() -> Any:
            nonlocal lost
            result = await fn()
            if lost:
                lost = False
                hit.append(what)
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return result

        return await original(what, once)

    store._retrying = retrying  # type: ignore[attr-defined]
    # Writes go through the group-commit writer: lose the answer of its next batch the same way.
    writer = store._writer  # type: ignore[attr-defined]
    send = writer._send

    async def send_and_lose(conn: Any, batch: Any) -> Any:
        rows = await send(conn, batch)
        if not hit:
            hit.append("write")
            writer._send = send
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return rows

    writer._send = send_and_lose
    return hit


@pytest.mark.postgres
async def test_lost_answers_after_commit_change_nothing(pg_schema: str) -> None:
    store = open_store(pg_schema)
    await store.open()
    try:
        hit = _lose_first_answer(store)
        new = NewRun("r", "alpha", "{}", 1.0, None, _event(0))
        record, created = await store.create_run(new, claim_for="w", lease_seconds=30)
        assert hit == ["create_run"]
        assert created and record.owner == "w" and record.epoch == 1, "it is this call's run"
        lease = Lease("r", "w", 1)

        hit = _lose_first_answer(store)
        assert await store.write(lease, [_event(1), _event(2)], None, now=2.0, lease_seconds=9) == 0
        assert hit == ["write"]

        hit = _lose_first_answer(store)
        message = InboxMessage(MessageKind.SIGNAL, "go", None, None, {"n": 1})
        delivery = await store.deliver("r", message, now=3.0)
        assert hit == ["deliver"] and delivery is not None and delivery.seq == 1
        assert len(await store.inbox("r")) == 1, "stored once"

        hit = _lose_first_answer(store)
        update = RunUpdate(storno.RunStatus.COMPENSATION_FAILED, error={"m": 1}, release=True)
        assert await store.write(lease, [_event(3)], update, now=4.0, lease_seconds=9) == 1
        assert hit == ["write"]

        hit = _lose_first_answer(store)
        operated = await store.operate(
            "r",
            expected=[storno.RunStatus.COMPENSATION_FAILED],
            status=storno.RunStatus.COMPENSATING,
            event_type=EventType.OPERATOR_ACTION,
            data={"action": "retry"},
            now=5.0,
            claimable=True,
        )
        assert hit == ["operate"] and operated is not None
        assert [e.seq for e in await store.history("r")] == [0, 1, 2, 3, 4]
        # A lease that is truly gone is still refused after a lost answer.
        hit = _lose_first_answer(store)
        with pytest.raises(storno.LeaseLostError):
            await store.write(lease, [_event(5)], None, now=6.0, lease_seconds=9)
    finally:
        await store.close()


# --- dropped connections ----------------------------------------------------------------


@storno.step(kind="compensable", compensate=lambda ctx, n: None)
async def reserve(ctx: storno.StepContext, n: int) -> str:
    await asyncio.sleep(0.01)
    return f"reserve-{n}"


@storno.step(kind="pivot")
async def pay(ctx: storno.StepContext, n: int) -> str:
    await asyncio.sleep(0.01)
    return f"pay-{n}"


@storno.step(kind="retryable")
async def notify(ctx: storno.StepContext, n: int) -> str:
    await asyncio.sleep(0.01)
    return f"notify-{n}"


@storno.saga
async def order(ctx: storno.SagaContext, n: int) -> list[str]:
    return [
        await ctx.step(reserve, n),
        await ctx.step(pay, n),
        await ctx.step(notify, n),
        await ctx.step(notify, n + 1000),
    ]


@pytest.mark.postgres
async def test_runs_finish_while_connections_are_killed_under_them(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"storno_kill_{uuid.uuid4().hex[:8]}"
    url = f"{pg_schema}&application_name={name}"
    kill = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()"
    )
    killed = 0
    caplog.set_level(logging.WARNING, logger="storno")
    async with storno.Storno(url, sagas=[order], lease_seconds=2) as app:
        handles = [await app.start(order, n) for n in range(80)]  # pending: no worker yet
        async with app.worker(concurrency=16, poll_interval=0.05):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while True:
                killed += (await asyncio.to_thread(pg_execute, pg_schema, kill, (name,)))[0][0]
                records = [await app.store.get_run(h.run_id) for h in handles]
                if all(r is not None and r.status in ENDED for r in records):
                    break
                assert loop.time() < deadline, "runs did not finish while connections dropped"
                await asyncio.sleep(0.01)
        results = [await h.result(timeout=5) for h in handles]
        histories = [await app.store.history(h.run_id) for h in handles]
    assert results == [
        [f"reserve-{n}", f"pay-{n}", f"notify-{n}", f"notify-{n + 1000}"] for n in range(80)
    ]
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert killed >= 5 and retried, f"{killed} connections killed, {len(retried)} retries"
    for history in histories:
        assert [e.seq for e in history] == list(range(len(history)))
        done = Counter(e.position for e in history if e.type == EventType.STEP_COMPLETED)
        assert sorted(done) == [0, 1, 2, 3] and set(done.values()) == {1}


# --- LISTEN/NOTIFY ----------------------------------------------------------------------


@storno.saga
async def hello(ctx: storno.SagaContext) -> str:
    return "hello"


@storno.saga
async def waits_for_go(ctx: storno.SagaContext) -> Any:
    return await ctx.wait_for_signal("go")


async def _idle_worker(app: storno.Storno) -> storno.Worker:
    """A worker that would not poll again for a minute: only a notification wakes it."""
    worker = app.worker(poll_interval=60)
    await worker.start()
    app.store.subscribe(worker.wake)
    app.store.subscribe(worker.wake)  # a second subscription changes nothing
    await asyncio.sleep(0.2)  # the LISTEN connection is up
    return worker


@pytest.mark.postgres
async def test_an_idle_worker_wakes_at_once_for_work_from_another_process(
    pg_schema: str,
) -> None:
    async with storno.Storno(pg_schema, sagas=[hello, waits_for_go]) as here:
        worker = await _idle_worker(here)
        try:
            async with storno.Storno(pg_schema, sagas=[hello, waits_for_go]) as elsewhere:
                started = time.monotonic()
                handle = await elsewhere.start(hello)
                assert await handle.result(timeout=5) == "hello"
                assert time.monotonic() - started < 2, "the new run waited for a poll"

                # A scheduled start: the notification carries its time, and the idle worker
                # claims it when it comes.
                started = time.monotonic()
                later = await elsewhere.start(hello.options(start_delay=1.0))
                assert await later.result(timeout=10) == "hello"
                assert 0.9 < time.monotonic() - started < 3

                # A signal sent from elsewhere wakes the run waiting for it.
                waiting = await elsewhere.start(waits_for_go)
                await wait_for(
                    lambda: _status_is(elsewhere, waiting.run_id, storno.RunStatus.WAITING)
                )
                started = time.monotonic()
                await elsewhere.signal(waiting.run_id, "go", {"ok": True})
                assert await waiting.result(timeout=5) == {"ok": True}
                assert time.monotonic() - started < 2
        finally:
            await worker.stop()


@pytest.mark.postgres
async def test_the_listener_reconnects_after_its_connection_drops(pg_schema: str) -> None:
    listening = (
        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %%' "
        "AND query LIKE %s AND pid <> pg_backend_pid()"
    )
    pattern = f"%storno:{_schema(pg_schema)}%"
    async with storno.Storno(pg_schema, sagas=[hello]) as here:
        worker = await _idle_worker(here)
        try:
            [(pid,)] = await asyncio.to_thread(pg_execute, pg_schema, listening, (pattern,))
            await asyncio.to_thread(
                pg_execute, pg_schema, "SELECT pg_terminate_backend(%s)", (pid,)
            )

            async def relistening() -> bool:
                rows = await asyncio.to_thread(pg_execute, pg_schema, listening, (pattern,))
                return bool(rows) and rows[0][0] != pid

            await wait_for(relistening, timeout=10, interval=0.05)
            async with storno.Storno(pg_schema, sagas=[hello]) as elsewhere:
                started = time.monotonic()
                handle = await elsewhere.start(hello)
                assert await handle.result(timeout=5) == "hello"
                assert time.monotonic() - started < 2
        finally:
            await worker.stop()


async def _status_is(app: storno.Storno, run_id: str, status: storno.RunStatus) -> bool:
    return await app.get_handle(run_id).status() is status


# --- worker processes -------------------------------------------------------------------


class PgScenario(Scenario):
    """test_crash's scenario (runs, ledger, verdict) with its runs in a PostgreSQL schema."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        super().__init__(tmp_path)
        self.url = url

    def app(self) -> storno.Storno:
        return storno.Storno(self.url, sagas=[crash_app.booking], steps=list(crash_app.STEPS))

    def create_runs(self, count: int, *, fail_every: int = 2) -> None:
        runs = {f"run-{i:04d}": i % fail_every == fail_every - 1 for i in range(count)}

        async def create() -> None:
            async with self.app() as app:
                for run_id, fail in runs.items():
                    saga = crash_app.booking.options(run_id=run_id)
                    await app.start(saga, f"order-{run_id}", fail)

        asyncio.run(create())
        self.expected.update(runs)

    def spawn(
        self,
        worker_id: str = "w1",
        *,
        crash_at: str | None = None,
        lease: float | None = None,
        concurrency: int = 8,
    ) -> Worker:
        assert crash_at is None, "these workers are killed from outside"
        self.spawned += 1
        stderr_path = self.dir / f"worker-{self.spawned}.stderr"
        cmd = [sys.executable, str(HERE), "worker", "--url", self.url, "--ledger"]
        cmd += [str(self.ledger), "--worker-id", worker_id, "--concurrency", str(concurrency)]
        if lease is not None:
            cmd += ["--lease", str(lease)]
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        return Worker(proc, stderr_path, worker_id, None)

    def runs(self) -> dict[str, storno.RunInfo]:
        async def read() -> dict[str, storno.RunInfo]:
            async with self.app() as app:
                return {run_id: await app.describe(run_id) for run_id in self.expected}

        return asyncio.run(read())

    def held_by(self, worker_id: str) -> set[str]:
        rows = pg_execute(
            self.url,
            f'SELECT run_id FROM "{_schema(self.url)}".storno_runs WHERE owner = %s '
            "AND status IN ('running', 'compensating')",
            (worker_id,),
        )
        return {run_id for (run_id,) in rows}

    def wait_for_effects(self, count: int, workers: list[Worker], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.effect_count() < count:
            for worker in workers:
                assert worker.proc.poll() is None, (
                    f"worker {worker.worker_id} ended early; stderr:\n{worker.stderr()[-4000:]}"
                )
            assert time.monotonic() < deadline, f"the ledger never reached {count} effects"
            time.sleep(0.01)

    def finish_all(self, workers: list[Worker], timeout: float) -> None:
        for worker in workers:
            code = worker.wait(timeout=timeout)
            assert code == 0, f"{worker.worker_id} exited {code}:\n{worker.stderr()[-4000:]}"


@pytest.mark.slow
@pytest.mark.postgres
def test_four_workers_share_a_thousand_runs_and_survive_one_killed(
    tmp_path: Path, pg_schema: str
) -> None:
    scenario = PgScenario(tmp_path, pg_schema)
    scenario.create_runs(1000, fail_every=4)  # 750 complete (4 effects), 250 compensate (6)
    total = 750 * 4 + 250 * 6
    workers = [scenario.spawn(f"w{i}", lease=3.0) for i in range(1, 5)]
    try:
        scenario.wait_for_effects(total // 3, workers, timeout=DEADLINE * 2)
        victim = workers[1]
        os.kill(victim.proc.pid, signal.SIGKILL)
        assert victim.wait() == SIGKILLED
        interrupted = scenario.held_by(victim.worker_id)
        at_kill = scenario.effect_count()
        assert interrupted, "the killed worker held no run: it interrupted nothing"
        assert at_kill < total, "the kill came after all the work was done"
        scenario.finish_all([w for w in workers if w is not victim], timeout=DEADLINE * 4)
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
    runs = scenario.check(resumed=interrupted)
    assert scenario.effect_count() == total
    by_worker = Counter(
        e.data["worker"] for info in runs.values() for e in info.history if e.type == "run_resumed"
    )
    assert set(by_worker) - {victim.worker_id}, "no other worker took over the killed one's runs"


def _cluster() -> tuple[str, str]:
    versions = sorted(os.listdir("/etc/postgresql"), key=lambda v: float(v))
    return versions[-1], "main"


def _server_up(url: str) -> bool:
    try:
        pg_execute(url, "SELECT 1")
    except Exception:
        return False
    return True


def _ensure_server_up(url: str) -> None:
    deadline = time.monotonic() + 60
    while not _server_up(url):
        version, cluster = _cluster()
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start"],
            capture_output=True,
            timeout=60,
        )
        if time.monotonic() > deadline:
            raise AssertionError("the PostgreSQL server did not come back up")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.skipif(
    shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir(),
    reason="restarting the server needs a local cluster managed by pg_ctlcluster",
)
def test_runs_in_flight_finish_after_the_server_restarts(tmp_path: Path, pg_schema: str) -> None:
    scenario = PgScenario(tmp_path, pg_schema)
    scenario.create_runs(300, fail_every=3)  # 200 complete (4 effects), 100 compensate (6)
    total = 200 * 4 + 100 * 6
    workers = [scenario.spawn(f"w{i}", lease=5.0) for i in range(1, 3)]
    version, cluster = _cluster()
    try:
        scenario.wait_for_effects(total // 4, workers, timeout=DEADLINE * 2)
        restart = subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert restart.returncode == 0, restart.stderr
        at_restart = scenario.effect_count()
        assert at_restart < total, "the restart came after all the work was done"
        scenario.finish_all(workers, timeout=DEADLINE * 4)
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
        _ensure_server_up(pg_schema)
    scenario.check()
    assert scenario.effect_count() == total
    logs = "".join(w.stderr() for w in workers)
    assert "retrying" in logs or "failed" in logs, "the workers never noticed the restart"


# --- the worker process -----------------------------------------------------------------


async def _work(url: str, worker_id: str, lease: float, concurrency: int, poll: float) -> None:
    app = storno.Storno(
        url, sagas=[crash_app.booking], steps=list(crash_app.STEPS), lease_seconds=lease
    )
    async with app:
        worker = app.worker(concurrency=concurrency, worker_id=worker_id, poll_interval=poll)
        async with worker:
            app.store.subscribe(worker.wake)
            while True:
                await asyncio.sleep(0.2)
                try:
                    busy = [await app.list_runs(status=s, limit=1) for s in ACTIVE]
                except storno.StoreError:
                    continue  # the server may be restarting
                if not any(busy):
                    return


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="a worker for the PostgreSQL tests")
    parser.add_argument("role", choices=["worker"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--poll", type=float, default=0.1)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    os.environ["CRASH_APP_LEDGER"] = str(Path(args.ledger).resolve())
    asyncio.run(_work(args.url, args.worker_id, args.lease, args.concurrency, args.poll))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


@pytest.mark.postgres
async def test_the_schema_has_autovacuum_visit_the_runs_and_the_outbox_early(
    pg_schema: str,
) -> None:
    async with storno.Storno(pg_schema):
        pass
    rows = await asyncio.to_thread(
        pg_execute,
        pg_schema,
        "SELECT c.relname, c.reloptions FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname IN "
        "('storno_runs', 'storno_outbox') ORDER BY c.relname",
        (_schema(pg_schema),),
    )
    options = {name: set(opts or ()) for name, opts in rows}
    assert {"autovacuum_vacuum_scale_factor=0.02", "autovacuum_vacuum_cost_delay=0"} <= options[
        "storno_runs"
    ]
    assert "autovacuum_analyze_scale_factor=0.02" in options["storno_outbox"]
