"""Operator commands run for real in a subprocess; the runs they act on are executed here."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import storno
from test_cli import cli

BROKEN = {"refunds": True}
LEDGER: list[str] = []


@storno.step(kind="compensable")
def reserve(ctx: storno.StepContext, what: str) -> str:
    LEDGER.append(f"reserve {what}")
    return what


@reserve.compensation
def unreserve(ctx: storno.CompensationContext[str], what: str) -> None:
    if BROKEN["refunds"] and what.startswith("fragile"):
        raise storno.TerminalError("refund API down")
    LEDGER.append(f"unreserve {what}")


@storno.step(kind="compensable", compensate=lambda ctx: None)
def decline(ctx: storno.StepContext) -> None:
    raise storno.TerminalError("declined")


@storno.saga
async def gated(ctx: storno.SagaContext, what: str) -> Any:
    await ctx.step(reserve, what)
    if what == "signal":
        return await ctx.wait_for_signal("go")
    approval = await ctx.wait_for_approval()
    return approval.by


@storno.saga
async def fragile(ctx: storno.SagaContext, what: str) -> None:
    await ctx.step(reserve, f"fragile {what}")
    await ctx.step(decline)


async def _settle(url: str, run_ids: list[str]) -> dict[str, str]:
    """Run a worker until every run has ended or is waiting; return their statuses."""
    settled = {"completed", "compensated", "cancelled", "compensation_failed", "waiting"}
    async with storno.Storno(url, sagas=[gated, fragile]) as app, app.worker():
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            statuses = {r: (await app.get_handle(r).status()).value for r in run_ids}
            if set(statuses.values()) <= settled or loop.time() > deadline:
                return statuses
            await asyncio.sleep(0.02)


async def _start(url: str, starts: list[tuple[Any, str]]) -> list[str]:
    async with storno.Storno(url, sagas=[gated, fragile]) as app:
        return [(await app.start(saga, arg)).run_id for saga, arg in starts]


def _json(done: Any) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_signal_approve_reject_cancel_from_the_command_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    ids = asyncio.run(
        _start(url, [(gated, "yes"), (gated, "no"), (gated, "signal"), (gated, "drop")])
    )
    yes, no, sig, drop = ids
    assert set(asyncio.run(_settle(url, ids)).values()) == {"waiting"}

    db = ("--db", url)
    assert _json(cli("approve", yes, "--by", "alice", "--json", *db, cwd=tmp_path))["by"] == "alice"
    assert (
        cli("reject", no, "--reason", "duplicate", "--by", "bob", *db, cwd=tmp_path).returncode == 0
    )
    first = _json(
        cli("signal", sig, "go", "--data", '{"x": 1}', "--id", "s1", "--json", *db, cwd=tmp_path)
    )
    again = _json(
        cli("signal", sig, "go", "--data", '{"x": 2}', "--id", "s1", "--json", *db, cwd=tmp_path)
    )
    assert (first["delivered"], again["delivered"]) == ("new", "duplicate")
    done = cli("cancel", drop, "--reason", "customer left", "--by", "ops", *db, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    statuses = asyncio.run(_settle(url, ids))
    assert statuses == {
        yes: "completed",
        no: "compensated",
        sig: "completed",
        drop: "cancelled",
    }
    shown = _json(cli("show", sig, "--json", *db, cwd=tmp_path))
    assert shown["result"] == {"x": 1}  # the repeated id was delivered once
    timeline = cli("show", drop, *db, cwd=tmp_path).stdout
    assert "cancel by ops: customer left" in timeline
    assert "unreserve drop" in LEDGER


def test_operator_commands_refuse_bad_input_with_clear_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    (run_id,) = asyncio.run(_start(url, [(gated, "x")]))
    db = ("--db", url)
    bad = cli("signal", run_id, "go", "--data", "{oops", *db, cwd=tmp_path)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    missing = cli("approve", "no-such-run", *db, cwd=tmp_path)
    assert missing.returncode == 1 and "no run with id 'no-such-run'" in missing.stderr
    early = cli("approve", run_id, *db, cwd=tmp_path)  # the run has not asked for one yet
    assert early.returncode == 1 and "not waiting for an approval" in early.stderr
    no_reason = cli("cancel", run_id, *db, cwd=tmp_path)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    not_dead = cli("retry", run_id, *db, cwd=tmp_path)
    assert not_dead.returncode == 1 and "only a run that needs a person" in not_dead.stderr


def test_dead_letters_listed_retried_and_resolved(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    BROKEN["refunds"] = True
    ids = asyncio.run(_start(url, [(fragile, "a"), (fragile, "b")]))
    assert set(asyncio.run(_settle(url, ids)).values()) == {"compensation_failed"}
    db = ("--db", url)
    listed = _json(cli("dead-letters", "--json", *db, cwd=tmp_path))
    assert {r["id"] for r in listed} == set(ids)
    assert all("refund API down" in r["error"]["message"] for r in listed)

    BROKEN["refunds"] = False
    assert cli("retry", ids[0], "--note", "API back", *db, cwd=tmp_path).returncode == 0
    resolved = cli(
        "resolve", ids[1], "--note", "refunded by hand", "--by", "eve", *db, cwd=tmp_path
    )
    assert resolved.returncode == 0, resolved.stderr
    assert asyncio.run(_settle(url, ids)) == {ids[0]: "compensated", ids[1]: "compensated"}
    assert _json(cli("dead-letters", "--json", *db, cwd=tmp_path)) == []
    assert "unreserve fragile a" in LEDGER and "unreserve fragile b" not in LEDGER
    timeline = cli("show", ids[1], *db, cwd=tmp_path).stdout
    assert "resolve by eve: refunded by hand" in timeline
