"""The SQLite journal: URLs, migrations, durability settings, claiming."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

import storno
from storno._model import Event, EventType, Lease
from storno._store import NewRun, open_store
from storno._store._sqlite import SQLiteStore, migrate, parse_sqlite_url


def test_sqlite_urls(tmp_path: Path):
    assert parse_sqlite_url("sqlite:///rel/x.db") == (Path("rel/x.db"), "full")
    assert parse_sqlite_url("sqlite:////abs/x.db") == (Path("/abs/x.db"), "full")
    assert parse_sqlite_url("sqlite:///x.db?synchronous=NORMAL") == (Path("x.db"), "normal")
    assert parse_sqlite_url("plain.db") == (Path("plain.db"), "full")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///:memory:", "names no file"),
        ("sqlite://host/x.db", "has a host part"),
        ("sqlite:///x.db?journal=delete", "unknown SQLite URL option"),
        ("sqlite:///x.db?synchronous=sometimes", "synchronous='sometimes'"),
        ("mysql://x/y", "unsupported database URL scheme 'mysql'"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url: str, message: str):
    with pytest.raises(storno.ConfigurationError) as caught:
        open_store(url)
    assert message in str(caught.value)


async def test_missing_folder_is_a_clear_error(tmp_path: Path):
    store = open_store(f"sqlite:///{tmp_path}/nope/x.db")
    with pytest.raises(storno.ConfigurationError, match="folder .* does not exist"):
        await store.open()


async def test_wal_and_synchronous_level_are_applied(tmp_path: Path):
    path = tmp_path / "x.db"
    store = SQLiteStore(f"sqlite:///{path}?synchronous=normal")
    await store.open()
    try:
        conn = store._reader()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        await store.close()
    default = SQLiteStore(f"sqlite:///{path}")
    await default.open()
    try:
        assert default._reader().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        await default.close()


def schema(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
    ).fetchall()
    return [(name, " ".join(sql.split())) for name, sql in rows]


def test_migrating_is_idempotent_and_versioned(tmp_path: Path):
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    assert migrate(conn) == 4
    first = schema(conn)
    assert migrate(conn) == 4
    assert schema(conn) == first
    assert {name for name, _ in first} >= {"storno_runs", "storno_events", "storno_schema"}
    conn.execute("INSERT INTO storno_schema VALUES (99, 0)")
    with pytest.raises(storno.StoreError, match="schema version 99, newer than this storno"):
        migrate(conn)


async def test_reopening_keeps_everything(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}"

    @storno.step(kind="retryable")
    def one(ctx: storno.StepContext) -> int:
        return 1

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(one)

    async with storno.Storno(url, sagas=[s]) as app, app.worker():
        handle = await app.start(s)
        await handle.result(timeout=10)
        before = await handle.describe()
    async with storno.Storno(url, sagas=[s]) as app:
        after = await app.describe(handle.run_id)
    assert after == before


async def test_claim_only_takes_known_sagas_and_pending_or_expired_runs(tmp_path: Path):
    store = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    await store.open()
    try:
        for run_id, saga in [("r1", "alpha"), ("r2", "beta"), ("r3", "alpha")]:
            event = Event(0, EventType.RUN_CREATED, 1.0, None, {}, "{}")
            await store.create_run(
                NewRun(run_id, saga, "{}", 1.0, None, event), claim_for=None, lease_seconds=30
            )
        got = await store.claim("w", limit=10, now=2.0, lease_seconds=10, sagas=["alpha"])
        assert sorted(r.run_id for r, _ in got) == ["r1", "r3"]
        assert all(r.status is storno.RunStatus.RUNNING for r, _ in got)
        assert await store.claim("v", limit=10, now=5.0, lease_seconds=10, sagas=["alpha"]) == []
        later = await store.claim("v", limit=1, now=13.0, lease_seconds=10, sagas=["alpha"])
        assert len(later) == 1 and later[0][1].epoch == 2
        assert await store.renew("w", ["r1", "r3"], now=13.0, lease_seconds=10) == {
            later[0][0].run_id
        }
    finally:
        await store.close()


async def test_a_failed_write_is_undone_alone_in_its_shared_commit(tmp_path: Path):
    store = SQLiteStore(f"sqlite:///{tmp_path / 'x.db'}")
    await store.open()
    try:
        leases = {}
        for run_id in ("good", "bad", "stale"):
            event = Event(0, EventType.RUN_CREATED, 1.0, None, {}, "{}")
            record, _ = await store.create_run(
                NewRun(run_id, "s", "{}", 1.0, None, event), claim_for="w", lease_seconds=30
            )
            leases[run_id] = Lease(run_id, "w", record.epoch)
        stale = Lease("stale", "w", leases["stale"].epoch + 1)  # another worker's epoch
        commits_before = store.write_counts[0]
        results = await asyncio.gather(
            store.write(leases["good"], [Event(1, EventType.RUN_RESUMED, 2.0)], None, now=2.0,
                        lease_seconds=30),
            # seq 0 is taken: the insert fails after the lease update was made.
            store.write(leases["bad"], [Event(0, EventType.RUN_RESUMED, 2.0)], None, now=2.0,
                        lease_seconds=30),
            store.write(stale, [Event(1, EventType.RUN_RESUMED, 2.0)], None, now=2.0,
                        lease_seconds=30),
            return_exceptions=True,
        )  # fmt: skip
        assert results[0] == 0
        assert isinstance(results[1], storno.StoreError)  # naming SQLite's error, its cause
        assert isinstance(results[1].__cause__, sqlite3.IntegrityError)
        assert isinstance(results[2], storno.LeaseLostError)
        assert [e.seq for e in await store.history("good")] == [0, 1]
        assert [e.seq for e in await store.history("bad")] == [0]
        bad = await store.get_run("bad")
        assert bad is not None and bad.updated_at == 1.0  # its lease update was undone too
        assert store.write_counts[0] - commits_before <= 2  # batched, then isolated once
    finally:
        await store.close()
