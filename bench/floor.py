"""The storage floor: raw durable commits per second of each database, from Python.

Every figure of the suite can be read as a share of these: a saga of 4 steps on storage that
commits C times a second cannot exceed C/4 sagas a second if each step costs one commit.

- SQLite, one single-row INSERT per transaction, in WAL mode at synchronous=FULL (storno's
  default), WAL at NORMAL (storno's ``?synchronous=normal``), and a rollback journal at FULL
  (what DBOS's SQLite default uses);
- PostgreSQL, one single-row INSERT per transaction with synchronous_commit on, from one
  connection, and from 32 connections at once (commits of concurrent connections share WAL
  flushes, which is what a server-side engine can exploit).
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import common

SQLITE_MODES = {
    "sqlite_wal_full": ("WAL", "FULL"),
    "sqlite_wal_normal": ("WAL", "NORMAL"),
    "sqlite_delete_full": ("DELETE", "FULL"),
}


def sqlite_commits_per_s(folder: Path, journal: str, synchronous: str, n: int) -> float:
    conn = sqlite3.connect(folder / f"floor-{journal}-{synchronous}.db", isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={journal}")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(20):  # warm up
        conn.execute("INSERT INTO t (v) VALUES (?)", (f"warm {i}",))
    start = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (v) VALUES (?)", (f"row {i}",))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def postgres_commits_per_s(n: int, connections: int) -> float:
    import psycopg

    url = common.plain_pg(common.pg_url())
    table = common.fresh_name("bench_floor")
    common.pg_execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, v text)")
    try:
        conns = [psycopg.connect(url, autocommit=True) for _ in range(connections)]
        for conn in conns:
            conn.execute("SET synchronous_commit = on")
            conn.execute(f"INSERT INTO {table} (v) VALUES ('warm')")
        per = n // connections
        barrier = threading.Barrier(connections + 1)

        def writer(conn: Any) -> None:
            barrier.wait()
            for i in range(per):
                conn.execute(f"INSERT INTO {table} (v) VALUES (%s)", (f"row {i}",))

        threads = [threading.Thread(target=writer, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        for conn in conns:
            conn.close()
        return per * connections / elapsed
    finally:
        common.pg_execute(f"DROP TABLE IF EXISTS {table}")


def measure(params: dict[str, Any]) -> dict[str, Any]:
    n = int(params.get("n", 2000))
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        for key, (journal, synchronous) in SQLITE_MODES.items():
            out[f"{key}_commits_per_s"] = sqlite_commits_per_s(Path(tmp), journal, synchronous, n)
    if not params.get("no_postgres"):
        try:
            out["postgres_1conn_commits_per_s"] = postgres_commits_per_s(n, 1)
            out["postgres_32conn_commits_per_s"] = postgres_commits_per_s(n * 2, 32)
        except Exception as exc:  # no server: the SQLite floors still stand
            out["postgres_error"] = f"{type(exc).__name__}: {exc}"
    return out
