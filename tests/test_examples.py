"""Every program in examples/ runs as it stands, in a subprocess, and its run is visible in
`storno show` with the model's decisions and the tool calls."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_and_shows_its_run(example: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'example.db'}"
    done = run(str(example), url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_id = re.search(r"storno show (\S+)", done.stdout)
    assert run_id, done.stdout
    shown = run("-m", "storno", "show", run_id.group(1), "--db", url, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "model:" in shown.stdout and "compensations" in shown.stdout


def test_the_booking_agent_undoes_in_reverse_after_an_approved_charge(tmp_path: Path) -> None:
    done = run(str(ROOT / "examples" / "booking_agent.py"), "sqlite:///b.db", cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert "approval asked for {'tool': 'charge_card'" in lines[0]
    undone = [line for line in lines if line.startswith(("sms to", "refunded", "released"))]
    assert undone[1:] == [
        "sms to +431234: sorry, your booking could not be completed",
        "refunded ada 650",
        "released 2026-12-04 10:00",
    ]


def test_the_invoice_agent_never_posts_to_slack(tmp_path: Path) -> None:
    done = run(str(ROOT / "examples" / "invoice_agent.py"), "sqlite:///i.db", cwd=tmp_path)
    assert "slack" not in done.stdout
    assert "crm: ACME -> invoiced" in done.stdout and "crm: ACME stage restored" in done.stdout


def test_the_mcp_booking_agent_undoes_through_the_servers_tools_in_reverse(
    tmp_path: Path,
) -> None:
    pytest.importorskip("mcp", reason="the MCP SDK is not installed (storno[mcp])")
    done = run(str(ROOT / "examples" / "booking_agent_mcp.py"), "sqlite:///m.db", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "close_account: unclassified, refused to the model" in done.stdout
    assert "closed ada" not in done.stdout
    undone = [line for line in lines if line.startswith(("sms to", "refunded", "released"))]
    assert undone[1:] == [
        "sms to +431234: sorry, your booking could not be completed",
        "refunded ch-1",
        "released 2026-12-04 10:00",
    ]
