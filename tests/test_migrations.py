"""Schema migrations on both backends: from empty they give the current definition, they are
numbered alike, they run once however many processes open the store, and ``storno db``
reports and applies them."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import storno
from conftest import pg_execute
from storno._cli import main
from storno._store._migrations import available, current_schema
from storno._store._sqlite import migrate

# --- SQLite -------------------------------------------------------------------------------


def _norm(sql: str | None) -> str:
    return " ".join((sql or "").replace("(", " ( ").replace(")", " ) ").split()).lower()


def sqlite_catalog(conn: sqlite3.Connection) -> dict[str, Any]:
    """Everything about the schema that matters, independent of how the DDL was written."""
    objects = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master "
        "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
    ).fetchall()
    catalog: dict[str, Any] = {}
    for kind, name, table, sql in objects:
        if kind == "table":
            catalog[f"table {name}"] = {
                "columns": conn.execute(f"PRAGMA table_xinfo({name})").fetchall(),
                "without_rowid": "without rowid" in _norm(sql),
                "foreign_keys": conn.execute(f"PRAGMA foreign_key_list({name})").fetchall(),
                "indexes": sorted(
                    (
                        idx[1],
                        idx[2],
                        idx[3],
                        idx[4],
                        conn.execute(f"PRAGMA index_xinfo({idx[1]})").fetchall(),
                    )
                    for idx in conn.execute(f"PRAGMA index_list({name})").fetchall()
                    if not idx[1].startswith("sqlite_autoindex")
                ),
            }
        elif kind == "index":
            where = _norm(sql).partition(" where ")[2]
            catalog[f"index {name}"] = {"table": table, "where": where}
        elif kind == "trigger":
            catalog[f"trigger {name}"] = {"table": table, "sql": _norm(sql)}
        else:
            catalog[f"{kind} {name}"] = {"table": table, "sql": _norm(sql)}
    return catalog


def test_sqlite_migrations_from_empty_give_the_current_schema(tmp_path: Path) -> None:
    migrated = sqlite3.connect(tmp_path / "migrated.db", isolation_level=None)
    defined = sqlite3.connect(tmp_path / "defined.db", isolation_level=None)
    try:
        assert migrate(migrated) == available("sqlite")[-1].version
        defined.executescript(current_schema("sqlite"))
        want, got = sqlite_catalog(defined), sqlite_catalog(migrated)
        assert sorted(got) == sorted(want), "objects differ: fix schema/sqlite.sql or a migration"
        for key in want:
            assert got[key] == want[key], f"{key} differs between migrations and schema/sqlite.sql"
    finally:
        migrated.close()
        defined.close()


def test_sqlite_catalog_comparison_sees_a_difference(tmp_path: Path) -> None:
    a = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    b = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    try:
        a.executescript(current_schema("sqlite"))
        b.executescript(current_schema("sqlite"))
        assert sqlite_catalog(a) == sqlite_catalog(b)
        b.execute("DROP INDEX storno_runs_by_wake")
        b.execute("CREATE INDEX storno_runs_by_wake ON storno_runs (wake_at, status)")
        assert sqlite_catalog(a) != sqlite_catalog(b)
    finally:
        a.close()
        b.close()


def test_both_backends_have_the_same_migrations() -> None:
    sqlite = [m.name for m in available("sqlite")]
    postgres = [m.name for m in available("postgres")]
    assert [m.version for m in available("sqlite")] == list(range(1, len(sqlite) + 1))
    assert postgres == sqlite, (
        "every schema change needs a migration for each backend, with the same number and "
        "name: add the missing ones under src/storno/_store/migrations/"
    )


# --- PostgreSQL ---------------------------------------------------------------------------


def pg_catalog(url: str, schema: str) -> dict[str, Any]:
    """Columns, constraints, indexes, triggers and functions of a schema, with its name
    taken out of the definitions so that two schemas compare."""

    def rows(sql: str) -> list[tuple[Any, ...]]:
        return [
            tuple(re.sub(rf'\b"?{schema}"?\.', "", v) if isinstance(v, str) else v for v in row)
            for row in pg_execute(url, sql, {"schema": schema})
        ]

    return {
        "columns": rows(
            "SELECT table_name, ordinal_position, column_name, data_type, is_nullable, "
            "column_default FROM information_schema.columns WHERE table_schema = %(schema)s "
            "ORDER BY table_name, ordinal_position"
        ),
        "constraints": rows(
            "SELECT cl.relname, co.conname, pg_get_constraintdef(co.oid) FROM pg_constraint co "
            "JOIN pg_class cl ON cl.oid = co.conrelid JOIN pg_namespace n "
            "ON n.oid = cl.relnamespace WHERE n.nspname = %(schema)s ORDER BY 1, 2"
        ),
        "indexes": rows(
            "SELECT tablename, indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = %(schema)s ORDER BY 1, 2"
        ),
        "triggers": rows(
            "SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t "
            "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %(schema)s AND NOT t.tgisinternal ORDER BY 1, 2"
        ),
        "functions": [
            (name, args, result, " ".join(source.split()))
            for name, args, result, source in rows(
                "SELECT p.proname, pg_get_function_identity_arguments(p.oid), "
                "pg_get_function_result(p.oid), p.prosrc FROM pg_proc p JOIN pg_namespace n "
                "ON n.oid = p.pronamespace WHERE n.nspname = %(schema)s ORDER BY 1, 2"
            )
        ],
        "tables": rows(
            "SELECT table_name, table_type FROM information_schema.tables "
            "WHERE table_schema = %(schema)s ORDER BY 1"
        ),
    }


def _schema_of(url: str) -> str:
    match = re.search(r"[?&]schema=([a-z0-9_]+)", url)
    assert match, url
    return match.group(1)


@pytest.mark.postgres
def test_postgres_migrations_from_empty_give_the_current_schema(pg_schema: str) -> None:
    migrated = _schema_of(pg_schema)
    defined = f"{migrated}_def"
    store = storno.Storno(pg_schema).store
    assert asyncio.run(store.migrate()) == available("postgres")[-1].version  # type: ignore[attr-defined]
    pg_execute(pg_schema, f'CREATE SCHEMA "{defined}"')
    try:
        pg_execute(pg_schema, f'SET search_path TO "{defined}"; {current_schema("postgres")}')
        want, got = pg_catalog(pg_schema, defined), pg_catalog(pg_schema, migrated)
        assert want["tables"], "the schema file created nothing"
        for part in want:
            assert got[part] == want[part], (
                f"{part} differ between migrations/postgres and schema/postgres.sql"
            )
        # ... and the comparison is not blind to a difference.
        pg_execute(pg_schema, f'DROP INDEX "{defined}".storno_runs_by_parent')
        assert pg_catalog(pg_schema, defined)["indexes"] != got["indexes"]
    finally:
        pg_execute(pg_schema, f'DROP SCHEMA "{defined}" CASCADE')


@pytest.mark.postgres
async def test_many_concurrent_opens_migrate_once(pg_schema: str) -> None:
    pg_execute(pg_schema, f'DROP SCHEMA "{_schema_of(pg_schema)}"')  # opens create it too
    stores = [storno.Storno(pg_schema).store for _ in range(12)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    versions = pg_execute(
        pg_schema, f'SELECT version FROM "{_schema_of(pg_schema)}".storno_schema ORDER BY 1'
    )
    assert [v for (v,) in versions] == [m.version for m in available("postgres")]


@pytest.mark.postgres
async def test_a_schema_newer_than_storno_is_refused(pg_schema: str) -> None:
    store = storno.Storno(pg_schema).store
    await store.open()
    await store.close()
    pg_execute(pg_schema, f'INSERT INTO "{_schema_of(pg_schema)}".storno_schema VALUES (99, 0)')
    with pytest.raises(storno.StoreError, match="schema version 99, newer than this storno"):
        await store.open()


@pytest.mark.postgres
async def test_history_and_inbox_refuse_changes_on_postgres(pg_schema: str) -> None:
    import psycopg

    @storno.step(kind="retryable")
    def one(ctx: storno.StepContext) -> int:
        return 1

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(one)

    async with storno.Storno(pg_schema, sagas=[s]) as app, app.worker():
        await app.run(s)
    schema = _schema_of(pg_schema)
    pg_execute(
        pg_schema,
        f'INSERT INTO "{schema}".storno_inbox (run_id, seq, kind, name, meta, sent_at) '
        "VALUES ('r', 1, 'signal', 'go', '{}', 0)",
    )
    for sql, message in [
        (f"UPDATE \"{schema}\".storno_events SET type = 'x'", "events cannot be changed"),
        (f'DELETE FROM "{schema}".storno_events', "events cannot be deleted"),
        (f'TRUNCATE "{schema}".storno_events', "events cannot be deleted"),
        (f"UPDATE \"{schema}\".storno_inbox SET name = 'x'", "messages cannot be changed"),
        (f'DELETE FROM "{schema}".storno_inbox', "messages cannot be deleted"),
        (f'TRUNCATE "{schema}".storno_inbox', "messages cannot be deleted"),
    ]:
        with pytest.raises(psycopg.errors.RaiseException, match=message):
            pg_execute(pg_schema, sql)


# --- storno db ----------------------------------------------------------------------------


def _db(*args: str) -> Any:
    result = CliRunner().invoke(main, ["db", *args])
    return result


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_storno_db_status_and_upgrade(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        request.getfixturevalue("pg_schema")
        if backend == "postgres"
        else f"sqlite:///{tmp_path / 'x.db'}"
    )
    latest = available(backend)[-1].version  # type: ignore[arg-type]
    before = _db("status", "--db", url, "--json")
    assert before.exit_code == 0, before.output
    info = json.loads(before.output)
    assert (info["exists"], info["current"], info["latest"]) == (False, 0, latest)
    assert info["pending"] == [m.name for m in available(backend)]  # type: ignore[arg-type]
    if backend == "sqlite":
        assert not (tmp_path / "x.db").exists(), "status must not create the database"

    done = _db("upgrade", "--db", url)
    assert done.exit_code == 0, done.output
    assert f"schema version 0 -> {latest}" in done.output

    again = _db("upgrade", "--db", url)
    assert again.exit_code == 0 and "already up to date" in again.output

    after = _db("status", "--db", url)
    assert after.exit_code == 0, after.output
    assert f"version {latest}, up to date" in after.output
    assert "pending" not in after.output


def test_storno_db_refuses_bad_urls(tmp_path: Path) -> None:
    done = _db("status", "--db", "mysql://x/y")
    assert done.exit_code == 1 and "unsupported database URL scheme 'mysql'" in done.output
    done = _db("upgrade", "--db", f"sqlite:///{tmp_path}/missing/x.db")
    assert done.exit_code == 1 and "does not exist" in done.output
    done = _db("status", "--db", "postgresql://u:secret@localhost/db?colour=blue")
    assert done.exit_code == 1 and 'invalid URI query parameter: "colour"' in done.output
    assert "secret" not in done.output, "the password must not be shown"
