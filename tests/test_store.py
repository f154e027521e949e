"""The SQLite journal: URLs, migrations, durability settings, claiming."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import storno
from storno._model import Event, EventType
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
    assert migrate(conn) == 3
    first = schema(conn)
    assert migrate(conn) == 3
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
