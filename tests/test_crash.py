"""Crash safety with real processes: a worker SIGKILLed anywhere loses nothing and repeats nothing.

Each test starts runs of ``crash_app.booking`` from this process, lets a worker subprocess
(``tests/crash_app.py``) execute them until it is killed with SIGKILL at a chosen point (or
from outside), then lets a fresh worker finish. The provider's ledger kept by the steps must
then show: every forward effect applied at most once per idempotency key, one key per step of a
run however often it was retried, completed runs fully applied, compensated runs fully undone
in reverse order; and the history must show every call registered before it was made (rule 1).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import crash_app
import storno
from storno._model import compensation_key, forward_key

pytestmark = pytest.mark.slow

CRASH_APP = Path(__file__).with_name("crash_app.py")
DEADLINE = 30.0  # seconds; generous, the machine is noisy
SIGKILLED = -signal.SIGKILL


@dataclass
class Worker:
    """A worker subprocess and where its output goes."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path
    worker_id: str
    crash_at: str | None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(
                f"worker {self.worker_id} (crash at {self.crash_at}) still running after "
                f"{timeout}s; stderr:\n{self.stderr()[-4000:]}"
            )

    def crash_details(self) -> dict[str, Any]:
        """The details of the point the worker killed itself at (from its marker line)."""
        lines = [line for line in self.stderr().splitlines() if line.startswith(crash_app.MARKER)]
        assert len(lines) == 1, f"want one crash marker, stderr:\n{self.stderr()[-4000:]}"
        details: dict[str, Any] = json.loads(lines[0].split(") ", 1)[1])
        return details


class Scenario:
    """A store, a ledger, some runs, and workers to execute them."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.db = tmp_path / "storno.db"
        self.ledger = tmp_path / "ledger.db"
        self.expected: dict[str, bool] = {}  # run id -> told to fail (so it must compensate)
        self.spawned = 0
        crash_app.init_ledger(self.ledger)

    # --- driving ------------------------------------------------------------------------

    def create_runs(self, count: int, *, fail_every: int = 2) -> None:
        runs = {f"run-{i:03d}": i % fail_every == fail_every - 1 for i in range(count)}

        async def create() -> None:
            async with crash_app.make_app(self.db) as app:
                for run_id, fail in runs.items():
                    saga = crash_app.booking.options(run_id=run_id)
                    await app.start(saga, f"order-{run_id}", fail)

        asyncio.run(create())
        self.expected.update(runs)

    def spawn(
        self,
        worker_id: str = "w1",
        *,
        crash_at: str | None = None,
        lease: float | None = None,
        concurrency: int = 3,
    ) -> Worker:
        self.spawned += 1
        stderr_path = self.dir / f"worker-{self.spawned}.stderr"
        cmd = [
            sys.executable,
            str(CRASH_APP),
            "--db",
            str(self.db),
            "--ledger",
            str(self.ledger),
            "--worker-id",
            worker_id,
            "--concurrency",
            str(concurrency),
        ]
        if crash_at:
            cmd += ["--crash-at", crash_at]
        if lease is not None:
            cmd += ["--lease", str(lease)]
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        return Worker(proc, stderr_path, worker_id, crash_at)

    def expect_killed(self, worker: Worker) -> dict[str, Any]:
        code = worker.wait()
        assert code == SIGKILLED, (
            f"worker should have died by SIGKILL at {worker.crash_at} but exited with {code} "
            f"(the point was never reached?); stderr:\n{worker.stderr()[-4000:]}"
        )
        return worker.crash_details()

    def finish(self, worker_id: str = "w1", **kwargs: Any) -> Worker:
        worker = self.spawn(worker_id, **kwargs)
        code = worker.wait()
        assert code == 0, f"recovery worker exited with {code}; stderr:\n{worker.stderr()[-4000:]}"
        return worker

    # --- reading ------------------------------------------------------------------------

    def runs(self) -> dict[str, storno.RunInfo]:
        async def read() -> dict[str, storno.RunInfo]:
            async with crash_app.make_app(self.db) as app:
                return {run_id: await app.describe(run_id) for run_id in self.expected}

        return asyncio.run(read())

    def ledger_rows(self) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
        conn = crash_app.connect_ledger(self.ledger)
        try:
            calls = conn.execute("SELECT * FROM calls ORDER BY id").fetchall()
            effects = conn.execute("SELECT * FROM effects ORDER BY id").fetchall()
        finally:
            conn.close()
        return calls, effects

    def effect_count(self) -> int:
        conn = crash_app.connect_ledger(self.ledger)
        try:
            count: int = conn.execute("SELECT COUNT(*) FROM effects").fetchone()[0]
        finally:
            conn.close()
        return count

    # --- the verdict --------------------------------------------------------------------

    def check(self, resumed: Iterable[str] = ()) -> dict[str, storno.RunInfo]:
        """Assert every run ended as intended and the ledger shows no double or lost effect."""
        runs = self.runs()
        calls, effects = self.ledger_rows()
        calls_by_run: dict[str, list[sqlite3.Row]] = defaultdict(list)
        effects_by_run: dict[str, list[sqlite3.Row]] = defaultdict(list)
        for row in calls:
            calls_by_run[row["run_id"]].append(row)
        for row in effects:
            effects_by_run[row["run_id"]].append(row)
        assert set(calls_by_run) <= set(self.expected), "the provider saw calls of unknown runs"

        # Each effect at most once per idempotency key (the provider's UNIQUE(key) makes a
        # second insert impossible; this also catches a key shared by two steps or runs).
        dupes = [k for k, n in Counter(row["key"] for row in effects).items() if n > 1]
        assert not dupes, f"effects applied more than once: {dupes}"

        problems: list[str] = []
        for run_id, fail in sorted(self.expected.items()):
            problems += _check_run(
                run_id, fail, runs[run_id], calls_by_run[run_id], effects_by_run[run_id]
            )
        for run_id in sorted(resumed):
            types = [event.type for event in runs[run_id].history]
            if "run_resumed" not in types:
                problems.append(f"{run_id}: was interrupted but its history shows no resume")
        assert not problems, "\n".join(problems)
        return runs


def _check_run(
    run_id: str,
    fail: bool,
    info: storno.RunInfo,
    calls: list[sqlite3.Row],
    effects: list[sqlite3.Row],
) -> list[str]:
    """Everything that is wrong with one run, as readable lines."""
    out: list[str] = []
    names = crash_app.STEP_NAMES
    fkeys = {name: forward_key(run_id, i, name) for i, name in enumerate(names)}
    ckeys = {name: compensation_key(run_id, i, name) for i, name in enumerate(names)}
    want = storno.RunStatus.COMPENSATED if fail else storno.RunStatus.COMPLETED
    if info.status is not want:
        out.append(f"{run_id}: ended {info.status.value}, want {want.value}: {info.error}")
        return out

    forward_calls = [c for c in calls if c["kind"] == "forward"]
    comp_calls = [c for c in calls if c["kind"] == "compensate"]
    verify_calls = [c for c in calls if c["kind"] == "verify"]
    calls = forward_calls + comp_calls
    forward_effects = [e for e in effects if e["kind"] == "forward"]
    undo_effects = [e for e in effects if e["kind"] == "undo"]

    # One key per (run, step) across every call, whoever made it: a step done or in flight
    # is never run again as if it were new (rule 2, structural keys).
    for name in names:
        used = {c["key"] for c in forward_calls if c["step"] == name}
        if used != {fkeys[name]}:
            out.append(f"{run_id}: step {name} called with keys {sorted(used)}, want one")
    for name in names:
        used = {c["key"] for c in comp_calls if c["step"] == name}
        if used - {ckeys[name]}:
            out.append(f"{run_id}: compensation of {name} called with keys {sorted(used)}")

    # Rule 1: every call was preceded by its durable start in the history (same key and
    # attempt), and an attempt number, once recorded, is never used for a second call.
    started = {
        (e.data.get("key"), e.data.get("attempt")): e.at
        for e in info.history
        if e.type in ("step_started", "compensation_step_started")
    }
    for (key, attempt), n in Counter((c["key"], c["attempt"]) for c in calls).items():
        if n > 1:
            out.append(f"{run_id}: {n} calls with key {key} claim to be attempt {attempt}")
    for c in calls:
        at = started.get((c["key"], c["attempt"]))
        if at is None or at > c["at"]:
            out.append(
                f"{run_id}: {c['kind']} call of {c['step']} attempt {c['attempt']} was made "
                f"without its durable start in the history (started at {at}, called {c['at']})"
            )

    # Rule 3: a step with a read-back is verified, not called again, once its effect landed.
    for v in verify_calls:
        again = [c for c in forward_calls if c["key"] == v["key"] and c["id"] > v["id"]]
        if v["seen_result"] == "applied" and again:
            out.append(f"{run_id}: {v['step']} was called again after its read-back found it")
    landed = {e["key"]: e["at"] for e in forward_effects}
    for c in forward_calls:
        if c["step"] in crash_app.VERIFIED_STEPS and c["at"] > landed.get(c["key"], c["at"]):
            out.append(
                f"{run_id}: {c['step']} (it has a read-back) was called again, attempt "
                f"{c['attempt']}, after its effect had landed"
            )

    applied = [e["step"] for e in forward_effects]
    if fail:
        if applied != list(crash_app.COMPENSATED_STEPS):
            out.append(f"{run_id}: forward effects {applied}, want the first three in order")
        undone = [e["step"] for e in undo_effects]
        if undone != list(reversed(crash_app.COMPENSATED_STEPS)):
            out.append(f"{run_id}: undo effects {undone}, want each applied step undone in reverse")
        for e in undo_effects:
            if e["key"] != ckeys[e["step"]] or e["undoes"] != fkeys[e["step"]]:
                out.append(f"{run_id}: undo of {e['step']} has key {e['key']} for {e['undoes']}")
        # A step whose attempt was cut short by the kill has an unknown outcome, which a
        # later refusal does not settle (rule 3): it is compensated, told UNKNOWN.
        unknown = {s.name for s in info.steps if s.outcome_unknown}
        for c in comp_calls:
            if c["forward_key"] != fkeys[c["step"]]:
                out.append(f"{run_id}: compensation of {c['step']} named {c['forward_key']}")
            if c["step"] in unknown and c["seen_result"] == "UNKNOWN":
                continue
            if c["seen_result"] != crash_app.expected_result(c["step"], fkeys[c["step"]]):
                out.append(
                    f"{run_id}: compensation of {c['step']} was told result {c['seen_result']}"
                )
        if comp_calls and forward_calls and forward_calls[-1]["id"] > comp_calls[0]["id"]:
            out.append(f"{run_id}: a forward call came after compensation began")
        if forward_effects and undo_effects and undo_effects[0]["id"] < forward_effects[-1]["id"]:
            out.append(f"{run_id}: an undo was applied before the forward path ended")
    else:
        if applied != list(names):
            out.append(f"{run_id}: forward effects {applied}, want all four in order")
        if comp_calls or undo_effects:
            out.append(f"{run_id}: completed run has compensation calls or undo effects")
        want_result = [crash_app.expected_result(n, fkeys[n]) for n in names]
        if info.result != want_result:
            out.append(f"{run_id}: result {info.result}, want {want_result}")
    return out


def _ended_before_kill(crash_at: str) -> bool:
    """Whether the worker dies just after its run's end was recorded (so it interrupts none)."""
    return crash_at.startswith(("status.written:completed", "status.written:compensated"))


def _interrupted_runs(crash_at: str, details: dict[str, Any]) -> set[str]:
    """The runs a worker killed itself in the middle of (from its crash details)."""
    if _ended_before_kill(crash_at):
        return set()
    if "run_ids" in details:
        return set(details["run_ids"])
    return {details["run_id"]}


# --- kill points ------------------------------------------------------------------------------

# POINT:QUALIFIER:N = die the N-th time POINT is reached for that step (or run end status).
# 6 runs, odd ones compensate; the first worker has 3 slots, so others wait pending.
KILL_POINTS = [
    # a fresh run: right after the claim committed, and inside its very first step
    "worker.claimed",
    "effect.before:book_slot:1",
    # the attempt is durably recorded, the call not made yet
    "step.started:book_slot:3",
    "step.started:charge_card:2",
    "step.started:send_sms:4",
    "step.started:sync_calendar:2",
    # the call returned, its result is not durable yet
    "step.returned:book_slot:2",
    "step.returned:charge_card:3",
    "step.returned:send_sms:1",
    "step.returned:sync_calendar:2",
    # inside a step: before the provider applied anything
    "effect.before:charge_card:3",
    "effect.before:sync_calendar:3",
    "effect.before:send_sms:2",  # the read-back finds nothing: send_sms is called again
    # inside a step: the provider applied the effect, the answer is lost
    "effect.after:book_slot:2",
    "effect.after:charge_card:4",
    "effect.after:send_sms:3",  # send_sms has a read-back: it finds the effect, no new call
    "effect.after:sync_calendar:2",
    # compensation, as seen by the engine
    "compensation.started:send_sms:2",
    "compensation.started:charge_card:1",
    "compensation.started:book_slot:3",
    "compensation.returned:send_sms:1",
    "compensation.returned:charge_card:2",
    "compensation.returned:book_slot:2",
    # inside a compensation, before and after the provider undid the effect
    "undo.before:send_sms:2",
    "undo.after:charge_card:1",
    "undo.after:book_slot:3",
    # the forward path's end is durable (run compensating), no compensation has started
    "status.written:compensating:2",
    # the run's end is about to be recorded
    "run.ending:completed:2",
    "run.ending:compensated:1",
    # the run's end was just recorded: nothing may run again
    "status.written:completed:1",
]


@pytest.mark.parametrize("crash_at", KILL_POINTS)
def test_sigkill_at_point_then_same_worker_id_resumes(tmp_path: Path, crash_at: str) -> None:
    scenario = Scenario(tmp_path)
    scenario.create_runs(6)
    details = scenario.expect_killed(scenario.spawn("w1", crash_at=crash_at))
    # Same worker id: the new process takes over the dead one's runs at once (a 30 s lease
    # would otherwise outlast the deadline).
    scenario.finish("w1")
    runs = scenario.check(resumed=_interrupted_runs(crash_at, details))
    if _ended_before_kill(crash_at):
        ended = runs[details["run_id"]]
        assert "run_resumed" not in [e.type for e in ended.history], "an ended run ran again"


def test_other_worker_takes_over_after_lease_expiry(tmp_path: Path) -> None:
    lease = 1.5
    scenario = Scenario(tmp_path)
    scenario.create_runs(6)
    details = scenario.expect_killed(
        scenario.spawn("w-dead", crash_at="step.returned:charge_card:2", lease=lease)
    )
    conn = sqlite3.connect(scenario.db)
    try:
        held = dict(
            conn.execute(
                "SELECT run_id, lease_expires_at FROM storno_runs WHERE owner = 'w-dead' AND "
                "status IN ('running', 'compensating')"
            ).fetchall()
        )
    finally:
        conn.close()
    assert details["run_id"] in held, f"the killed run should still be leased: {held}"

    scenario.finish("w-live", lease=lease)
    runs = scenario.check(resumed=set(held))
    for run_id, expires_at in held.items():
        resumes = [e for e in runs[run_id].history if e.type == "run_resumed"]
        assert resumes, f"{run_id} was never resumed"
        # Nobody touched the run while the dead worker's lease was valid; then w-live did.
        assert resumes[0].data["worker"] == "w-live"
        assert resumes[0].at >= expires_at, (run_id, resumes[0].at, expires_at)


def test_sigkill_from_outside_repeatedly(tmp_path: Path) -> None:
    scenario = Scenario(tmp_path)
    scenario.create_runs(30, fail_every=3)  # 20 complete (4 effects), 10 compensate (3 + 3)
    total = 20 * 4 + 10 * 6
    kills = []
    for threshold in (10, 35, 65, 95, 120):
        worker = scenario.spawn("w1", concurrency=8)
        deadline = time.monotonic() + DEADLINE
        while scenario.effect_count() < threshold:
            assert worker.proc.poll() is None, (
                f"worker ended before the ledger reached {threshold} effects; "
                f"stderr:\n{worker.stderr()[-4000:]}"
            )
            assert time.monotonic() < deadline, f"ledger never reached {threshold} effects"
            time.sleep(0.002)
        os.kill(worker.proc.pid, signal.SIGKILL)
        assert worker.wait() == SIGKILLED
        kills.append(scenario.effect_count())
    assert kills[-1] < total, f"the last kill came too late to interrupt anything: {kills}"
    scenario.finish("w1", concurrency=8)
    scenario.check()
    assert scenario.effect_count() == total


def test_restarted_worker_with_fewer_slots_takes_over_all_its_runs_at_once(
    tmp_path: Path,
) -> None:
    scenario = Scenario(tmp_path)
    scenario.create_runs(6)
    # With 6 slots the dead worker holds all 6 runs, each leased for 30 s.
    scenario.expect_killed(scenario.spawn("w1", crash_at="step.returned:send_sms:1", concurrency=6))
    # Restarted under the same id with 2 slots it should work through all of them at once
    # (3 batches of well under a second), not wait for the 30 s leases of the other four.
    worker = scenario.spawn("w1", concurrency=2)
    assert worker.wait(timeout=6.0) == 0
    scenario.check()
