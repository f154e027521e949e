"""Shared fixtures: every test gets its own real database.

Tests that take ``db_url`` (or ``app``) run once per selected backend, with ids ``[sqlite]``
and ``[postgres]``: on SQLite a fresh file in ``tmp_path``, on PostgreSQL a fresh schema in
the database named by ``$STORNO_TEST_POSTGRES_URL``, dropped after the test.

Selecting backends: ``--backend sqlite|postgres|all`` (or ``$STORNO_TEST_BACKEND``); the
default ``all`` runs SQLite, and PostgreSQL where ``STORNO_TEST_POSTGRES_URL`` is set (where
it is not, the PostgreSQL variants skip and say why). ``--require-postgres`` (or
``STORNO_TEST_REQUIRE_POSTGRES=1``; CI sets it) turns every skipped PostgreSQL test into a
failure, so a missing server cannot pass unnoticed. Tests marked ``postgres`` need the server
by nature; tests marked ``sqlite_only`` look inside the SQLite file and run on SQLite only.

Message brokers likewise: tests marked ``nats`` or ``rabbitmq`` read their server from
``$STORNO_TEST_NATS_URL`` / ``$STORNO_TEST_RABBITMQ_URL`` through :func:`broker_url` and skip,
saying which variable is missing, where it is unset; ``--require-brokers`` (or
``STORNO_TEST_REQUIRE_BROKERS=1``; CI sets it) turns those skips into failures.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

import storno

POSTGRES_ENV = "STORNO_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgres")
_SKIP_NO_URL = (
    f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test); "
    f"it is not set"
)

BROKER_ENVS = {"nats": "STORNO_TEST_NATS_URL", "rabbitmq": "STORNO_TEST_RABBITMQ_URL"}
_BROKER_NAMES = {"nats": "NATS", "rabbitmq": "RabbitMQ"}
_BROKER_EXAMPLES = {
    "nats": "nats://127.0.0.1:4222",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
}

# SQLite-only tests in modules that do not mark them: they open the SQLite file by its path.


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("storno")
    group.addoption(
        "--backend",
        choices=("sqlite", "postgres", "all"),
        default=os.environ.get("STORNO_TEST_BACKEND", "all"),
        help="Store backend(s) the db_url tests run against (default all: SQLite, and "
        f"PostgreSQL where ${POSTGRES_ENV} is set; env STORNO_TEST_BACKEND).",
    )
    group.addoption(
        "--require-postgres",
        action="store_true",
        default=os.environ.get("STORNO_TEST_REQUIRE_POSTGRES", "") not in ("", "0"),
        help=f"Fail, rather than skip, PostgreSQL tests when ${POSTGRES_ENV} is unset.",
    )
    group.addoption(
        "--require-brokers",
        action="store_true",
        default=os.environ.get("STORNO_TEST_REQUIRE_BROKERS", "") not in ("", "0"),
        help="Fail, rather than skip, NATS and RabbitMQ tests when "
        + " or ".join(f"${env}" for env in BROKER_ENVS.values())
        + " is unset (env STORNO_TEST_REQUIRE_BROKERS=1).",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--require-postgres") and config.getoption("--backend") == "sqlite":
        raise pytest.UsageError("--require-postgres contradicts --backend sqlite")


def _selected(config: pytest.Config) -> list[str]:
    choice = config.getoption("--backend")
    return list(BACKENDS) if choice == "all" else [choice]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_backend" not in metafunc.fixturenames:
        return
    backends = _selected(metafunc.config)
    sqlite_only = metafunc.definition.get_closest_marker("sqlite_only") is not None
    if sqlite_only:
        backends = [b for b in backends if b == "sqlite"]
    if metafunc.definition.get_closest_marker("postgres") is not None:
        backends = [b for b in backends if b == "postgres"]
    if not backends:
        backends = ["sqlite" if sqlite_only else "postgres"]
        marks = [pytest.mark.skip(reason=f"not selected by --backend {_choice(metafunc)}")]
        metafunc.parametrize(
            "db_backend", [pytest.param(b, marks=marks) for b in backends], indirect=True
        )
        return
    metafunc.parametrize(
        "db_backend",
        [
            pytest.param(b, marks=[pytest.mark.postgres] if b == "postgres" else [])
            for b in backends
        ],
        indirect=True,
    )


def _choice(metafunc: pytest.Metafunc) -> str:
    return str(metafunc.config.getoption("--backend"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "postgres" in _selected(config):
        return
    skip = pytest.mark.skip(reason=f"not selected by --backend {config.getoption('--backend')}")
    for item in items:
        if item.get_closest_marker("postgres") is not None:
            item.add_marker(skip)


_postgres_passed = 0
_brokers_passed = dict.fromkeys(BROKER_ENVS, 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    global _postgres_passed
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("postgres") is not None:
        if report.when == "call" and report.passed:
            _postgres_passed += 1
        if report.skipped and item.config.getoption("--require-postgres"):
            _fail_skipped(report, "PostgreSQL test skipped under --require-postgres")
    for kind in BROKER_ENVS:
        if item.get_closest_marker(kind) is None:
            continue
        if report.when == "call" and report.passed:
            _brokers_passed[kind] += 1
        if report.skipped and item.config.getoption("--require-brokers"):
            _fail_skipped(report, f"{_BROKER_NAMES[kind]} test skipped under --require-brokers")


def _fail_skipped(report: pytest.TestReport, why: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{why}: {reason}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    ran = session.testscollected - session.testsfailed > 0
    missing = []
    if session.config.getoption("--require-postgres") and ran and not _postgres_passed:
        missing.append("--require-postgres: no PostgreSQL test passed in this session")
    if session.config.getoption("--require-brokers") and ran:
        missing += [
            f"--require-brokers: no {_BROKER_NAMES[kind]} test passed in this session"
            for kind, passed in _brokers_passed.items()
            if not passed
        ]
    if missing:
        writer = session.config.get_terminal_writer()
        writer.line()
        for line in missing:
            writer.line(line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def postgres_url() -> str:
    """The PostgreSQL server for tests; skips the test (with the reason) where it is unset."""
    url = os.environ.get(POSTGRES_ENV, "").strip()
    if not url:
        pytest.skip(_SKIP_NO_URL)
    return url


def broker_url(kind: str) -> str:
    """The test server of a broker (``"nats"`` or ``"rabbitmq"``), from ``BROKER_ENVS``; skips
    the test, naming the variable, where it is unset. Mark such a test ``nats`` / ``rabbitmq``
    so that ``--require-brokers`` turns the skip into a failure."""
    env = BROKER_ENVS[kind]
    url = os.environ.get(env, "").strip()
    if not url:
        pytest.skip(
            f"{_BROKER_NAMES[kind]} tests need {env} (e.g. {_BROKER_EXAMPLES[kind]}); it is not set"
        )
    return url


def with_schema(url: str, schema: str) -> str:
    """``url`` with its ``schema=`` option set to ``schema``."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "schema"]
    query.append(("schema", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _libpq(url: str) -> str:
    """The URL without storno's own options, for a plain psycopg connection."""
    parts = urlsplit(url)
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in ("schema", "pool_size")
    ]
    return urlunsplit(parts._replace(query=urlencode(query)))


def pg_execute(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on the test server (autocommit) and return its rows."""
    import psycopg

    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A PostgreSQL URL whose ``schema=`` names a fresh, empty schema, dropped afterwards."""
    base = postgres_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        pg_execute(base, f'CREATE SCHEMA "{schema}"')
    except Exception as exc:
        pytest.fail(f"cannot create a test schema on {POSTGRES_ENV}={base}: {exc}")
    try:
        yield with_schema(base, schema)
    finally:
        pg_execute(base, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def db_url(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if db_backend == "postgres":
        url: str = request.getfixturevalue("pg_schema")
        return url
    return f"sqlite:///{tmp_path / 'storno.db'}"


class Crash(BaseException):
    """Stands for a process dying at a fault point: it escapes the engine's error handling."""


async def wait_for(
    condition: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.01
) -> Any:
    """Poll an async condition until it is truthy; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
async def app(db_url: str) -> AsyncIterator[storno.Storno]:
    async with storno.Storno(db_url) as application:
        yield application


class crash_at:
    """Make the engine 'die' at a fault point: raise :class:`Crash` there, once."""

    def __init__(self, point: str, **match: Any) -> None:
        self.point = point
        self.match = match
        self.fired = 0

    def _hook(self, name: str, details: dict[str, Any]) -> None:
        if self.fired or name != self.point:
            return
        if all(details.get(k) == v for k, v in self.match.items()):
            self.fired += 1
            raise Crash(f"crash at {name} {details}")

    def __enter__(self) -> crash_at:
        from storno import _faults

        self._previous = _faults.set_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        from storno import _faults

        _faults.set_hook(self._previous)
