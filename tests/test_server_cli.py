"""``storno serve`` as a process (refusals, a start, a graceful stop) and ``storno stuck``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_server_support import OPERATOR_TOKEN, READ_TOKEN, make_old_run

STORNO = [sys.executable, "-m", "storno"]


def run(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
    base = {k: v for k, v in os.environ.items() if not k.startswith("STORNO_API")}
    return subprocess.run(
        [*STORNO, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        cwd=cwd,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_refuses_to_start_open_by_accident(tmp_path: Path):
    db = f"sqlite:///{tmp_path / 's.db'}"
    none = run(["serve", "--db", db])
    assert none.returncode == 1 and "no API tokens" in none.stderr
    wide = run(["serve", "--db", db, "--insecure-open", "--host", "0.0.0.0"])
    assert wide.returncode == 2 and "loopback only" in wide.stderr
    both = run(["serve", "--db", db, "--insecure-open"], env={"STORNO_API_TOKENS": OPERATOR_TOKEN})
    assert both.returncode == 2 and "Drop one" in both.stderr
    weak = run(["serve", "--db", db], env={"STORNO_API_TOKENS": "hunter2xyz"})
    assert weak.returncode == 1 and "an operator token" in weak.stderr
    assert "at least 16" in weak.stderr and "hunter2xyz" not in weak.stderr


def test_serve_runs_and_stops_gracefully(tmp_path: Path):
    port = free_port()
    db = f"sqlite:///{tmp_path / 's.db'}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STORNO_API")},
        "STORNO_API_TOKENS": f"ops:{OPERATOR_TOKEN}",
        "STORNO_API_READ_TOKENS": READ_TOKEN,
    }
    tests_dir = str(Path(__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, env.get("PYTHONPATH")]))
    command = [*STORNO, "serve", "--db", db, "--port", str(port), "--log-format", "json"]
    command += ["--app", "test_server_support:serve_app", "--worker"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)
        headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        started = httpx.post(
            f"{url}/api/v1/runs", json={"saga": "lodging", "args": ["ada"]}, headers=headers
        )
        assert started.status_code == 201, started.text
        run_id = started.json()["run"]["id"]
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/api/v1/runs/{run_id}", headers=headers).json()["status"] != (
            "completed"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        spec = httpx.get(f"{url}/openapi.json").json()
        assert spec["openapi"].startswith("3.") and "/api/v1/runs" in spec["paths"]
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(r.get("run_id") == run_id and r.get("step") == "book_slot" for r in lines)
    assert any(r.get("path") == f"/api/v1/runs/{run_id}" for r in lines)
    assert OPERATOR_TOKEN not in err and READ_TOKEN not in err


def test_stuck_command(tmp_path: Path):
    db = f"sqlite:///{tmp_path / 's.db'}"
    make_old_run(db, "orphan", "old-one", 7200)
    make_old_run(db, "orphan", "fresh-one", 10)
    listed = run(["stuck", "--db", db])
    assert listed.returncode == 0, listed.stderr
    assert "old-one" in listed.stdout and "fresh-one" not in listed.stdout
    assert "not picked up by any worker" in listed.stdout
    as_json = json.loads(run(["stuck", "--db", db, "--older-than", "5s", "--json"]).stdout)
    assert [r["id"] for r in as_json] == ["old-one", "fresh-one"]
    assert as_json[0]["stuck_threshold_seconds"] == 5
    assert run(["stuck", "--db", db, "--fail-if-any"]).returncode == 3
    bad = run(["stuck", "--db", db, "--older-than", "soon"])
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    missing = run(["stuck", "--db", f"sqlite:///{tmp_path / 'none.db'}"])
    assert missing.returncode == 1 and "no storno database" in missing.stderr


@pytest.mark.parametrize("flag", ["--help"])
def test_help_lists_the_commands(flag: str):
    out = run([flag]).stdout
    assert "serve" in out and "stuck" in out


def test_serve_refuses_when_the_app_url_and_db_disagree(tmp_path: Path):
    (tmp_path / "pinned.py").write_text("import storno\napp = storno.Storno('sqlite:///a.db')\n")
    other = f"sqlite:///{tmp_path / 'b.db'}"
    done = run(["serve", "--app", "pinned:app", "--db", other, "--insecure-open"], cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "pinned:app names its database in its code (sqlite:///a.db)" in done.stderr
    assert f"--db says {other}" in done.stderr
    assert not (tmp_path / "a.db").exists() and not (tmp_path / "b.db").exists()
