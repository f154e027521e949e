"""A database password never reaches storno's output: every place a URL is shown redacts it.

The PostgreSQL test server uses trust authentication, so a URL with a password still connects:
each output path is run for real and its whole output searched for the secret.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storno._errors import StoreError
from storno._store._migrations import redact
from storno._store._postgres import PostgresStore

SECRET = "s3cr3t-Hunter2"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("STORNO_")}
APP = """
import storno

@storno.step(kind="retryable")
def noop(ctx: storno.StepContext) -> None:
    return None

@storno.saga
async def nothing(ctx: storno.SagaContext) -> None:
    await ctx.step(noop)

app = storno.Storno(sagas=[nothing])
"""


def storno_cli(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "storno", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout + done.stderr


def until_line(args: list[str], cwd: Path, wanted: str) -> str:
    """Start a long-running command, read its stderr until a line holds ``wanted``, stop it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "storno", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break  # it ended
            seen.append(line)
            if wanted in line:
                break
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    text = "".join(seen) + out + err
    assert wanted in text, text
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_redact_hides_passwords_in_user_info_and_options() -> None:
    assert redact(f"postgresql://u:{SECRET}@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact(f"postgresql://u@h/db?schema=s&password={SECRET}&sslmode=require") == (
        "postgresql://u@h/db?schema=s&password=***&sslmode=require"
    )
    assert SECRET not in redact(f"postgres://u:p@{SECRET}/x@h/db?sslpassword={SECRET}")
    assert redact(f"host=h password={SECRET} dbname=d") == "host=h password=*** dbname=d"
    assert redact("sqlite:////home/a@b/storno.db") == "sqlite:////home/a@b/storno.db"


@pytest.mark.postgres
def test_no_output_shows_the_database_password(
    pg_schema: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    user, rest = pg_schema.split("://", 1)[1].split("@", 1)
    in_query = f"{pg_schema}&password={SECRET}"
    in_userinfo = f"postgresql://{user}:{SECRET}@{rest}"
    (tmp_path / "secret_app.py").write_text(textwrap.dedent(APP))
    outputs = {
        "list before the tables exist": storno_cli("list", "--db", in_query, cwd=tmp_path),
        "db status, no schema": storno_cli("db", "status", "--db", in_query, cwd=tmp_path),
        "db upgrade": storno_cli("db", "upgrade", "--db", in_query, cwd=tmp_path),
        "db upgrade again": storno_cli("db", "upgrade", "--db", in_userinfo, cwd=tmp_path),
        "db status": storno_cli("db", "status", "--db", in_userinfo, cwd=tmp_path),
        "db status --json": storno_cli("db", "status", "--json", "--db", in_query, cwd=tmp_path),
        "bad schema option": storno_cli(
            "list", "--db", f"{in_userinfo}&schema=Bad-Name", cwd=tmp_path
        ),
        "unsupported scheme": storno_cli("list", "--db", f"mysql://u:{SECRET}@h/db", cwd=tmp_path),
        "unsupported scheme, query": storno_cli(
            "list", "--db", f"mysql://h/db?password={SECRET}", cwd=tmp_path
        ),
        "sqlite option": storno_cli(
            "list", "--db", f"sqlite:///x.db?password={SECRET}", cwd=tmp_path
        ),
        "worker start-up": until_line(
            ["worker", "--app", "secret_app:app", "--db", in_query], tmp_path, "started on"
        ),
        "serve start-up": until_line(
            ["serve", "--db", in_userinfo, "--insecure-open", "--port", str(free_port())],
            tmp_path,
            "serving",
        ),
    }
    # The store's retry error, and the warnings logged while it retries.
    store = PostgresStore(f"postgresql://u@127.0.0.1:1/db?connect_timeout=1&password={SECRET}")
    store.retry_attempts, store.retry_seconds = 2, 1.0
    with caplog.at_level(logging.WARNING), pytest.raises(StoreError) as refused:
        asyncio.run(store.open())
    outputs["store retry error"] = str(refused.value) + caplog.text + repr(store)

    leaked = [name for name, text in outputs.items() if SECRET in text]
    assert not leaked, {name: outputs[name] for name in leaked}
    assert "***" in outputs["db status"] and "up to date" in outputs["db status"]
    assert "password=***" in outputs["worker start-up"]
    assert ":***@" in outputs["serve start-up"]
    assert "127.0.0.1:1" in outputs["store retry error"]
