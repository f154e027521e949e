"""The ``storno`` command, run for real in a subprocess against SQLite files in tmp_path."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

STEPS = ["book_slot", "charge_card", "send_sms", "sync_calendar"]
ENV = {k: v for k, v in os.environ.items() if k != "STORNO_URL"}


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "storno", *args],
        cwd=cwd,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli_json(*args: str, cwd: Path) -> Any:
    done = cli(*args, "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def ops(run: dict[str, Any], ledger: str) -> list[str]:
    return [entry["op"] for entry in run["ledgers"][ledger]]


# --- demo --------------------------------------------------------------------------------


def test_demo_completes_and_reads_back_the_lost_charge(tmp_path: Path) -> None:
    run = cli_json("demo", "--db", f"sqlite:///{tmp_path / 'd.db'}", cwd=tmp_path)

    assert run["status"] == "completed"
    assert [s["name"] for s in run["steps"]] == STEPS
    assert all(s["status"] == "completed" and s["kind"] == "compensable" for s in run["steps"])
    charge = run["steps"][1]
    # The first answer was lost; the read-back found the charge, so it was not made again.
    assert charge["attempts"] == 1
    assert charge["verified"] == [True]
    assert charge["outcome_unknown"] is False
    events = [e for e in run["history"] if e["position"] == 1]
    assert [e["type"] for e in events] == ["step_started", "attempt_failed", "verified"]
    assert events[1]["data"]["outcome_unknown"] is True
    assert events[2]["data"]["applied"] is True
    assert ops(run, "payment provider") == ["charge"]
    assert run["ledgers"]["payment provider"][0]["key"] == charge["idempotency_key"]


def test_demo_fail_at_sync_calendar_compensates_in_reverse(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    run = cli_json("demo", "--fail-at", "sync_calendar", "--db", url, cwd=tmp_path)

    assert run["status"] == "compensated"
    *done, failed = run["steps"]
    assert failed["name"] == "sync_calendar"
    assert failed["status"] == "failed"
    assert failed["compensation"] is None  # it never took effect: nothing to undo
    assert [s["compensation"]["status"] for s in done] == ["completed"] * 3
    order = [e["position"] for e in run["history"] if e["type"] == "compensation_step_completed"]
    assert order == [2, 1, 0]
    # Each effect is undone by a counter-entry; the original stays visible.
    assert ops(run, "slot calendar") == ["book", "release"]
    assert ops(run, "payment provider") == ["charge", "refund"]
    assert ops(run, "sms gateway") == ["send", "send"]
    assert ops(run, "calendar api") == []
    for step, ledger in zip(
        done, ["slot calendar", "payment provider", "sms gateway"], strict=True
    ):
        forward, undo = run["ledgers"][ledger]
        assert forward["key"] == step["idempotency_key"]
        assert undo["key"] == step["compensation"]["idempotency_key"]


def test_demo_fail_at_book_slot_compensates_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    run = cli_json("demo", "--fail-at", "book_slot", "--db", url, cwd=tmp_path)

    assert run["status"] == "compensated"
    assert [(s["name"], s["status"], s["compensation"]) for s in run["steps"]] == [
        ("book_slot", "failed", None)
    ]
    assert not [e for e in run["history"] if e["type"].startswith("compensation_step")]
    assert all(entries == [] for entries in run["ledgers"].values())


def test_demo_text_output_shows_the_timeline(tmp_path: Path) -> None:
    done = cli("demo", "--fail-at", "sync_calendar", cwd=tmp_path)  # default --db

    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert (tmp_path / "storno.db").exists()
    assert "status compensated" in out
    for name in STEPS:
        assert name in out
    assert "compensat" in out
    assert "outcome unknown" in out
    assert "read-back" in out
    assert "refund" in out  # the ledgers


def test_demo_fail_at_rejects_unknown_steps(tmp_path: Path) -> None:
    done = cli("demo", "--fail-at", "teleport", cwd=tmp_path)
    assert done.returncode == 2
    assert "teleport" in done.stderr


# --- list and show -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[str]]:
    """A database with two demo runs (completed, then compensated), newest last."""
    folder = tmp_path_factory.mktemp("demo")
    url = f"sqlite:///{folder / 'demo.db'}"
    ids = [
        cli_json("demo", "--db", url, cwd=folder)["id"],
        cli_json("demo", "--fail-at", "send_sms", "--db", url, cwd=folder)["id"],
    ]
    return folder, url, ids


def test_list_shows_the_runs(demo_db: tuple[Path, str, list[str]]) -> None:
    folder, url, (completed, compensated) = demo_db

    listed = cli_json("list", "--db", url, cwd=folder)
    runs = listed["runs"]
    assert {r["id"] for r in runs} == {completed, compensated}
    assert all(r["saga"] == "booking" for r in runs)
    assert (listed["total"], listed["offset"], listed["truncated"]) == (2, 0, False)
    only = cli_json("list", "--status", "compensated", "--db", url, cwd=folder)["runs"]
    assert [r["id"] for r in only] == [compensated]

    table = cli("list", "--db", url, cwd=folder)
    assert table.returncode == 0, table.stderr
    assert completed in table.stdout and compensated in table.stdout


def test_list_takes_several_statuses_pages_on_and_says_how_many_it_shows(
    demo_db: tuple[Path, str, list[str]],
) -> None:
    folder, url, (completed, compensated) = demo_db

    both = cli_json(
        "list", "--status", "completed", "--status", "compensated", "--db", url, cwd=folder
    )
    assert {r["id"] for r in both["runs"]} == {completed, compensated}
    first = cli_json("list", "--limit", "1", "--db", url, cwd=folder)
    assert [r["id"] for r in first["runs"]] == [compensated]  # newest first
    assert (first["total"], first["limit"], first["truncated"]) == (2, 1, True)
    second = cli_json("list", "--limit", "1", "--offset", "1", "--db", url, cwd=folder)
    assert [r["id"] for r in second["runs"]] == [completed]
    assert (second["total"], second["offset"], second["truncated"]) == (2, 1, True)

    table = cli("list", "--limit", "1", "--db", url, cwd=folder)
    assert table.returncode == 0, table.stderr
    assert "1 of 2 shown" in table.stdout and "--offset 1 shows the next" in table.stdout
    whole = cli("list", "--db", url, cwd=folder)
    assert "shown" not in whole.stdout


def test_show_prints_the_timeline(demo_db: tuple[Path, str, list[str]]) -> None:
    folder, url, (_, compensated) = demo_db

    run = cli_json("show", compensated, "--db", url, cwd=folder)
    assert run["id"] == compensated
    assert run["status"] == "compensated"
    assert run["history"][0]["type"] == "run_created"

    text = cli("show", compensated, "--db", url, cwd=folder)
    assert text.returncode == 0, text.stderr
    assert compensated in text.stdout
    assert "sms gateway refused" in text.stdout  # the error
    assert "compensations" in text.stdout


def test_show_unknown_run_names_it(demo_db: tuple[Path, str, list[str]]) -> None:
    folder, url, _ = demo_db
    done = cli("show", "no-such-run", "--db", url, cwd=folder)
    assert done.returncode == 1
    assert "no-such-run" in done.stderr


def test_list_rejects_an_unknown_status(demo_db: tuple[Path, str, list[str]]) -> None:
    folder, url, _ = demo_db
    done = cli("list", "--status", "bogus", "--db", url, cwd=folder)
    assert done.returncode == 2
    assert "bogus" in done.stderr


def test_list_does_not_create_a_missing_database(tmp_path: Path) -> None:
    done = cli("list", "--db", f"sqlite:///{tmp_path / 'missing.db'}", cwd=tmp_path)
    assert done.returncode == 1
    assert "missing.db" in done.stderr
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize("kind", ["empty", "other tables"])
@pytest.mark.parametrize("command", [["list"], ["show", "r1"], ["stuck"], ["dead-letters"]])
def test_read_commands_refuse_a_sqlite_file_that_is_not_a_storno_database(
    tmp_path: Path, kind: str, command: list[str]
) -> None:
    path = tmp_path / "notes.db"
    path.touch()
    if kind == "other tables":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE notes (body TEXT)")
    before = path.read_bytes()

    done = cli(*command, "--db", f"sqlite:///{path}", cwd=tmp_path)

    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{str(path)!r} is not a storno database" in done.stderr
    assert ("an empty file" if kind == "empty" else "no storno tables") in done.stderr
    assert path.read_bytes() == before  # no storno table was added
    assert not (tmp_path / "notes.db-wal").exists()


# --- worker ------------------------------------------------------------------------------

APP_MODULE = """
import storno

@storno.step(kind="retryable")
async def greet(ctx: storno.StepContext, name: str) -> str:
    return f"hello {{name}} ({{ctx.idempotency_key}})"

@storno.saga
async def greeting(ctx: storno.SagaContext, name: str) -> str:
    return await ctx.step(greet, name)

app = storno.Storno({url!r}, sagas=[greeting])
"""


def write_app(folder: Path, module: str, url: str) -> None:
    (folder / f"{module}.py").write_text(textwrap.dedent(APP_MODULE.format(url=url)))


def test_worker_executes_a_run_and_stops_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    write_app(tmp_path, "tests_module", url)
    args = ["worker", "--app", "tests_module:app", "--poll-interval", "0.05"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "storno", *args],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        monkeypatch.syspath_prepend(str(tmp_path))
        module = importlib.import_module("tests_module")

        async def start_and_wait() -> str:
            async with module.app as app:
                handle = await app.start(module.greeting.options(run_id="run-1"), "ada")
                result: str = await handle.result(timeout=20)  # the worker must run it
                return result

        assert asyncio.run(start_and_wait()).startswith("hello ada (st-")
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=20)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    assert f"started on {url}" in err
    assert "run run-1: picked up" in err
    assert "run run-1: completed" in err
    assert err.rstrip().endswith("stopped")


@pytest.mark.parametrize("given", ["--db", "STORNO_URL"])
def test_worker_refuses_when_the_app_url_and_the_command_url_disagree(
    tmp_path: Path, given: str
) -> None:
    write_app(tmp_path, "pinned_app", "sqlite:///app.db")
    other = "postgresql://ops:hunter2@db.internal/app?schema=storno"
    args = ["worker", "--app", "pinned_app:app"]
    env = dict(ENV)
    if given == "--db":
        args += ["--db", other]
    else:
        env["STORNO_URL"] = other

    done = cli(*args, cwd=tmp_path, env=env)

    assert done.returncode == 1, done.stderr
    where = "--db" if given == "--db" else "$STORNO_URL"
    says = f"pinned_app:app names its database in its code (sqlite:///app.db) but {where} says"
    assert says in done.stderr
    assert "postgresql://ops:***@db.internal/app?schema=storno" in done.stderr
    assert "hunter2" not in done.stderr
    assert not (tmp_path / "app.db").exists()


def test_worker_accepts_the_same_database_written_two_ways(tmp_path: Path) -> None:
    write_app(tmp_path, "same_app", "sqlite:///app.db")
    args = ["worker", "--app", "same_app:app", "--db", f"sqlite:///{tmp_path / 'app.db'}"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "storno", *args],
        cwd=tmp_path,
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stderr is not None
        first = worker.stderr.readline()  # blocks until the worker has started (or died)
        worker.send_signal(signal.SIGINT)
        rest = worker.communicate(timeout=20)[1]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert "started on sqlite:///app.db" in first, first + rest
    assert worker.returncode == 0


@pytest.mark.parametrize("given", ["--db", "STORNO_URL"])
def test_worker_runs_an_app_without_a_url_on_the_command_url(tmp_path: Path, given: str) -> None:
    (tmp_path / "free_app.py").write_text(
        textwrap.dedent(APP_MODULE.format(url="").replace("Storno('', ", "Storno("))
    )
    other = f"sqlite:///{tmp_path / 'other.db'}"
    args = ["worker", "--app", "free_app:app"]
    env = dict(ENV)
    if given == "--db":
        args += ["--db", other]
    else:
        env["STORNO_URL"] = other
    worker = subprocess.Popen(
        [sys.executable, "-m", "storno", *args],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stderr is not None
        first = worker.stderr.readline()  # blocks until the worker has started (or died)
        worker.send_signal(signal.SIGINT)
        rest = worker.communicate(timeout=20)[1]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert f"started on {other}" in first, first + rest
    assert worker.returncode == 0
    assert (tmp_path / "other.db").exists()
    assert not (tmp_path / "storno.db").exists()


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("nosuchmodule:app", "no module named 'nosuchmodule'"),
        ("badapp:missing", "has no attribute 'missing'"),
        ("badapp:number", "not a storno.Storno application"),
        ("badapp", "is not MODULE:ATTR"),
    ],
)
def test_worker_rejects_a_bad_app(tmp_path: Path, ref: str, says: str) -> None:
    (tmp_path / "badapp.py").write_text("number = 3\n")
    done = cli("worker", "--app", ref, cwd=tmp_path)
    assert done.returncode == 2
    assert says in done.stderr
    assert "--app" in done.stderr


# --- the documentation -------------------------------------------------------------------


def test_the_examples_in_docs_cli_md_run(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    script = "\n".join(re.findall(r"```sh\n(.*?)```", page, re.S))
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "storno").exists():
        pytest.skip(f"no storno script next to {sys.executable}")
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV.get('PATH', '')}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "status compensated" in done.stdout
    assert "exit code 1" in done.stdout  # storno show no-such-run
    assert "hello ada" in done.stdout  # the run the worker executed
    assert "run " in done.stderr and ": completed" in done.stderr
    # The events section: a correlation, a dead letter discarded, the relay alone.
    assert "started by event order-7/0 (order.placed) from run order-7" in done.stdout
    assert "discarded: event order-7/0@packing/0 (parcel.packed, key order-7)" in done.stdout
    assert "'order-7/0' (sent)" in done.stderr
    assert "stopped: 1 sent, 0 refused" in done.stderr


# --- the worker's log ----------------------------------------------------------------------

FORGED = "2030-01-01 00:00:00,000 INFO run forged: completed"
DEAD_LETTER_APP = f"""
import storno

@storno.step(kind="compensable")
def reserve(ctx: storno.StepContext) -> str:
    return "held"

@reserve.compensation
def release(ctx: storno.CompensationContext[str]) -> None:
    raise storno.TerminalError("release API down\\n{FORGED}")

@storno.step(kind="compensable", compensate=lambda ctx: None)
def decline(ctx: storno.StepContext) -> None:
    raise storno.TerminalError("declined\\r\\n{FORGED}")

@storno.saga
async def doomed(ctx: storno.SagaContext) -> None:
    await ctx.step(reserve)
    await ctx.step(decline)

app = storno.Storno(sagas=[doomed])
"""


def test_worker_logs_a_dead_letter_as_an_error_on_one_line(tmp_path: Path) -> None:
    import storno

    (tmp_path / "doomed_app.py").write_text(DEAD_LETTER_APP)
    url = f"sqlite:///{tmp_path / 'storno.db'}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "storno", "worker", "--app", "doomed_app:app", "--db", url],
        cwd=tmp_path,
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sys.path.insert(0, str(tmp_path))
        module = importlib.import_module("doomed_app")

        async def start_and_wait() -> None:
            async with storno.Storno(url, sagas=[module.doomed]) as app:
                handle = await app.start(module.doomed.options(run_id="doomed-1"))
                with pytest.raises(storno.CompensationFailedError):
                    await handle.result(timeout=20)

        asyncio.run(start_and_wait())
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=20)
    finally:
        sys.path.remove(str(tmp_path))
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    lines = err.splitlines()
    assert not [line for line in lines if line.startswith(FORGED[:19])], err
    [dead] = [line for line in lines if "run doomed-1: compensation_failed" in line]
    assert " ERROR run doomed-1" in dead, err
    assert "release API down\\n2030-01-01" in dead


async def test_the_worker_log_follows_runs_through_an_application_listener(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import storno
    from storno._cli._serve import RunLog

    release = asyncio.Event()

    @storno.step(kind="compensable", compensate=lambda ctx: None)
    def hold(ctx: storno.StepContext) -> str:
        return "held"

    @storno.step(kind="compensable", compensate=lambda ctx: None)
    def decline(ctx: storno.StepContext) -> None:
        raise storno.TerminalError("card declined")

    @storno.step(kind="compensable", compensate=lambda ctx: None)
    async def hang(ctx: storno.StepContext) -> None:
        await release.wait()

    @storno.saga
    async def declined(ctx: storno.SagaContext) -> None:
        await ctx.step(hold)
        await ctx.step(decline)

    @storno.saga
    async def stuck(ctx: storno.SagaContext) -> None:
        await ctx.step(hang)

    runs = RunLog()
    app = storno.Storno(f"sqlite:///{tmp_path / 'runs.db'}", sagas=[declined, stuck])
    app.add_listener(runs)
    with caplog.at_level("INFO", logger="storno.cli"):
        async with app:
            worker = storno.Worker(app, poll_interval=0.05)
            await worker.start()
            with pytest.raises(storno.RunCompensatedError):
                await (await app.start(declined.options(run_id="declined-1"))).result(timeout=10)
            await app.start(stuck.options(run_id="stuck-1"))
            for _ in range(200):
                if "stuck-1" in runs.open:
                    break
                await asyncio.sleep(0.02)
            in_flight = worker.active_runs
            await worker.stop(grace=0.1)
            await runs.handed_back(app, in_flight)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "run declined-1: picked up (saga declined, running)") in lines
    [(level, ended)] = [line for line in lines if line[1].startswith("run declined-1: comp")]
    assert level == "INFO" and ended.startswith("run declined-1: compensated: ")
    assert "card declined" in ended
    assert ("INFO", "run stuck-1: left running, to be resumed") in lines
