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
    assert "compensations" in shown.stdout
    if "agent" in example.stem:
        assert "model:" in shown.stdout


def test_the_choreographed_booking_undoes_each_participants_work(tmp_path: Path) -> None:
    done = run(str(ROOT / "examples" / "choreography.py"), "sqlite:///c.db", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["slot: 2026-12-04 10:00 held for " + lines[0].rsplit(" ", 1)[1],
                         "payment: 650 authorized"]  # fmt: skip
    assert "payment: authorization auth-1 voided" in lines
    assert "slot: 2026-12-04 10:00 released" in lines
    assert "notification: to ada@example.com: sorry, your card was declined" in lines
    assert lines.index("payment: authorization auth-1 voided") < lines.index(
        "slot: 2026-12-04 10:00 released"
    )
    assert {
        "hold_slot: compensated",
        "take_payment: compensated",
        "tell_customer: completed",
    } <= set(lines)


@pytest.mark.nats
def test_the_choreographed_booking_over_nats(tmp_path: Path) -> None:
    from conftest import broker_url

    url = broker_url("nats")
    done = run(str(ROOT / "examples" / "choreography.py"), "sqlite:///c.db", "--nats", url,
               "--ok", cwd=tmp_path)  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr
        assert "notification: to ada@example.com: your booking is confirmed" in done.stdout
        assert "hold_slot: completed" in done.stdout
    finally:
        _drop_example_streams(url)


def _drop_example_streams(url: str) -> None:
    import asyncio

    import nats

    async def drop() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name.startswith("choreography-"):
                await js.delete_stream(info.config.name)
        await nc.close()

    asyncio.run(drop())


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
