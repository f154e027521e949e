"""The fault kit: FakeProvider's faults each do what they say, its ledger survives a SIGKILL,
check_fault_schedules finds broken sagas and passes sound ones, and check_failure_points
answers signal and approval waits."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import storno
from fault_sagas import BOOKING_OPERATIONS, booking
from storno.testing import (
    Crash,
    Declined,
    FakeProvider,
    Fault,
    FaultScheduleError,
    Outage,
    ProviderConflict,
    ProviderThrottled,
    ProviderTimeout,
    ProviderUnavailable,
    Schedule,
    check_failure_points,
    check_fault_schedules,
    random_schedule,
)

OPS = {"charge": "compensable", "sms": "noncompensable"}


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[FakeProvider]:
    with FakeProvider(tmp_path / "ledger.db", OPS) as p:
        yield p


def step_ctx(run: str = "run-1", position: int = 0, attempt: int = 1) -> storno.StepContext:
    key = f"key-{run}-{position}"
    return storno.StepContext(run, "charge", position, key, attempt, storno.StepKind.COMPENSABLE)


def undo_ctx(forward: storno.StepContext, key: str = "undo-1") -> storno.CompensationContext[Any]:
    return storno.CompensationContext(
        forward.run_id,
        forward.step,
        forward.position,
        key,
        forward.idempotency_key,
        1,
        storno.UNKNOWN,
        {},
    )


# --- the provider ----------------------------------------------------------------------


def test_a_repeat_of_the_key_returns_the_first_answer_and_changes_nothing(
    provider: FakeProvider,
) -> None:
    ctx = step_ctx()
    first = provider.call(ctx, "charge", amount=100)
    again = provider.call(ctx, "charge", amount=99)  # a retry with other arguments
    assert again == first == {"id": first["id"], "op": "charge", "amount": 100}
    (effect,) = provider.ledger()
    assert (effect.op, effect.fields, effect.status, effect.undone) == (
        "charge",
        {"amount": 100},
        "applied",
        0,
    )
    assert provider.lookup(ctx, "charge") == first
    assert provider.lookup(step_ctx(position=1), "charge") is storno.NOT_APPLIED


def test_500_and_429_come_before_the_key_check(provider: FakeProvider) -> None:
    ctx = step_ctx()
    provider.call(ctx, "charge", amount=100)  # landed before the faults start
    provider.schedule(
        Schedule((Fault("error", "charge", nth=1), Fault("throttle", "charge", nth=2))),
        run_id="run-1",
    )
    with pytest.raises(ProviderUnavailable) as error:
        provider.call(ctx, "charge", amount=100)
    assert error.value.status == 500
    with pytest.raises(ProviderThrottled) as throttled:
        provider.call(ctx, "charge", amount=100)
    assert throttled.value.status == 429 and throttled.value.retry_after == 2.0
    # Neither says anything about the key: the charge is there, once.
    assert provider.call(ctx, "charge", amount=100)["amount"] == 100
    assert [e.status for e in provider.ledger()] == ["applied"]


def test_a_dropped_answer_lands_the_write_and_raises_a_timeout(provider: FakeProvider) -> None:
    ctx = step_ctx()
    provider.schedule(Schedule((Fault("drop", "charge"),)))  # every run
    with pytest.raises(ProviderTimeout) as lost:
        provider.call(ctx, "charge", amount=100)
    assert isinstance(lost.value, TimeoutError)  # the engine records an unknown outcome
    assert [e.status for e in provider.ledger()] == ["applied"]
    assert provider.call(ctx, "charge", amount=100)["amount"] == 100  # the retry: replayed
    assert len(provider.ledger()) == 1


def test_a_late_write_is_in_progress_then_lands(provider: FakeProvider) -> None:
    ctx = step_ctx()
    provider.schedule(Schedule((Fault("late", "charge", lands_after=3),)), run_id="run-1")
    with pytest.raises(ProviderTimeout):
        provider.call(ctx, "charge", amount=100)  # request 1
    assert [e.status for e in provider.ledger()] == ["pending"]
    with pytest.raises(ProviderConflict):
        provider.lookup(ctx, "charge")  # request 2: a read-back cannot say "not applied"
    with pytest.raises(ProviderConflict):
        provider.undo(undo_ctx(ctx))  # request 3: nor can an undo
    answer = provider.call(ctx, "charge", amount=100)  # request 4: it has landed
    assert answer["amount"] == 100
    assert [e.status for e in provider.ledger()] == ["applied"]
    # A write still in progress when a check ends lands then.
    other = step_ctx(run="run-2")
    provider.schedule(Schedule((Fault("late", "charge", lands_after=5),)), run_id="run-2")
    with pytest.raises(ProviderTimeout):
        provider.call(other, "charge", amount=7)
    assert provider.land_pending() == 1
    assert provider.lookup(other, "charge")["amount"] == 7


def test_an_outage_fails_every_request_in_its_window(provider: FakeProvider) -> None:
    ctx = step_ctx()
    provider.schedule(Schedule(outages=(Outage(start=2, length=3),)), run_id="run-1")
    provider.call(ctx, "charge", amount=1)  # request 1
    requests = [
        lambda: provider.call(ctx, "charge", amount=1),
        lambda: provider.lookup(ctx, "charge"),
        lambda: provider.undo(undo_ctx(ctx)),
    ]
    for request in requests:
        with pytest.raises(ProviderUnavailable) as down:
            request()
        assert down.value.status == 503
    assert provider.lookup(ctx, "charge")["amount"] == 1  # request 5: back
    # Faults count each run's own requests: another run is not in the outage.
    assert provider.call(step_ctx(run="run-2"), "charge", amount=2)["amount"] == 2


def test_a_decline_is_recorded_and_replayed_under_the_key(provider: FakeProvider) -> None:
    ctx = step_ctx()
    provider.schedule(Schedule((Fault("decline", "charge"),)))
    with pytest.raises(Declined) as declined:
        provider.call(ctx, "charge", amount=100)
    assert isinstance(declined.value, storno.TerminalError)
    with pytest.raises(Declined):
        provider.call(ctx, "charge", amount=100)
    assert provider.lookup(ctx, "charge") is storno.NOT_APPLIED
    assert provider.undo(undo_ctx(ctx)) is None  # nothing to undo
    assert [e.status for e in provider.ledger()] == ["declined"]
    assert provider.effects() == {}


def test_undo_reverses_the_forward_key_once_per_compensation_key(provider: FakeProvider) -> None:
    ctx = step_ctx()
    assert provider.undo(undo_ctx(ctx)) is None  # nothing landed yet: a no-op
    provider.call(ctx, "charge", amount=100)
    assert provider.effects() == {("charge", ("amount", 100)): 1}
    first = provider.undo(undo_ctx(ctx), "refund")
    assert provider.undo(undo_ctx(ctx), "refund") == first  # a retry: replayed
    assert provider.ledger()[0].undone == 1
    assert provider.effects() == {}
    provider.undo(undo_ctx(ctx, key="undo-2"), "refund")  # a second refund by another key
    assert provider.ledger()[0].undone == 2
    assert provider.effects() == {("charge", ("amount", 100)): -1}
    sms = storno.StepContext("run-1", "sms", 1, "sms-key", 1, storno.StepKind.NONCOMPENSABLE)
    provider.call(sms, "sms", body="hi")
    with pytest.raises(ValueError, match="cannot be undone"):
        provider.undo(undo_ctx(sms, key="undo-sms"))


def test_random_schedules_are_reproducible_from_their_seed() -> None:
    import random

    ops = [("charge", "compensable"), ("sms", "noncompensable")]
    draws = [random_schedule(random.Random(f"7:{i}"), ops, ["charge"]) for i in range(200)]
    again = [random_schedule(random.Random(f"7:{i}"), ops, ["charge"]) for i in range(200)]
    assert draws == again
    assert any(s.crashes for s in draws) and any(s.outages for s in draws)
    assert {f.kind for s in draws for f in s.faults} == {
        "error",
        "throttle",
        "drop",
        "late",
        "decline",
    }
    calm = [
        random_schedule(random.Random(i), ops, ["charge"], lost_answers=False) for i in range(200)
    ]
    assert not any(s.loses_answers for s in calm)
    assert all(f.op != "sms" for s in draws for f in s.faults if f.kind == "decline")


# --- durability across a killed process --------------------------------------------------

WORKER = """
import asyncio, os, signal, sys
sys.path.insert(0, {tests!r})
import storno
from storno import _faults
from fault_sagas import BOOKING_OPERATIONS, booking
from storno.testing import FakeProvider

provider = FakeProvider({ledger!r}, BOOKING_OPERATIONS)
saga, steps = booking(provider)

def die(point, details):
    # The charge has landed at the provider; the engine has not recorded it yet.
    if point == "step.returned" and details["step"] == "charge_card":
        os.kill(os.getpid(), signal.SIGKILL)

async def main():
    _faults.set_hook(die)
    async with storno.Storno({db!r}, sagas=[saga], steps=steps) as app:
        async with app.worker(worker_id="w1"):
            await app.start(saga.options(run_id="r1"), "ada", "mon-10", 120)
            await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_the_ledger_survives_a_sigkilled_process(tmp_path: Path) -> None:
    ledger, db = tmp_path / "ledger.db", f"sqlite:///{tmp_path / 'storno.db'}"
    script = tmp_path / "worker.py"
    tests = str(Path(__file__).parent)
    script.write_text(textwrap.dedent(WORKER.format(tests=tests, ledger=str(ledger), db=db)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    provider = FakeProvider(ledger, BOOKING_OPERATIONS)
    assert [(e.op, e.status) for e in provider.ledger("r1")] == [
        ("book", "applied"),
        ("charge", "applied"),
    ]
    # Another process resumes the run under the dead worker's id: the charge's retry (or
    # read-back) finds the charge, so it is in the ledger once, and the run completes.
    saga, steps = booking(provider)
    async with storno.Storno(db, sagas=[saga], steps=steps) as app, app.worker(worker_id="w1"):
        await app.get_handle("r1").result(timeout=30)
    assert [(e.op, e.status, e.undone) for e in provider.ledger("r1")] == [
        ("book", "applied", 0),
        ("charge", "applied", 0),
        ("sms", "applied", 0),
        ("calendar", "applied", 0),
    ]
    provider.close()


# --- check_fault_schedules ---------------------------------------------------------------


async def test_a_fault_free_schedule_and_schedules_without_lost_answers_pass(
    tmp_path: Path,
) -> None:
    provider = FakeProvider(tmp_path / "ledger.db", BOOKING_OPERATIONS)
    saga, steps = booking(provider)
    args = ["ada", "mon-10", 120]
    report = await check_fault_schedules(
        saga, args, provider=provider, steps=steps, schedules=[Schedule()]
    )
    assert report.ends == {"completed": 1} and report.seed is None
    report = await check_fault_schedules(
        saga, args, provider=provider, steps=steps, schedules=300, seed=3, lost_answers=False
    )
    assert report.ok, report.summary()
    assert report.ends["compensated"] > 0 and report.ends["completed"] > 0


async def test_scripted_schedules_with_crashes_and_late_writes_pass(tmp_path: Path) -> None:
    """Faults today's engine settles correctly: a crash after the call, read back; a late
    write that lands while the read-back is refused; a decline."""
    provider = FakeProvider(tmp_path / "ledger.db", BOOKING_OPERATIONS)
    saga, steps = booking(provider)
    schedules = [
        Schedule(crashes=(Crash("charge_card", "after_call"),)),
        Schedule(crashes=(Crash("sync_calendar", "before_call"),)),
        Schedule((Fault("late", "charge", lands_after=1),)),
        Schedule((Fault("decline", "charge"),)),
        Schedule((Fault("error", "calendar", times=4),), (Outage(2, 3),)),
    ]
    report = await check_fault_schedules(
        saga, ["ada", "mon-10", 120], provider=provider, steps=steps, schedules=schedules
    )
    assert [o.status.value if o.status else None for o in report.outcomes] == [
        "completed",
        "completed",
        "completed",
        "compensated",
        "completed",
    ], report.summary()


async def test_it_finds_a_step_that_sends_a_new_key_on_each_attempt(tmp_path: Path) -> None:
    provider = FakeProvider(tmp_path / "ledger.db", OPS)

    @storno.step(name="careless_charge")
    def charge(ctx: storno.StepContext, amount: int) -> Any:
        fresh = f"{ctx.idempotency_key}-{ctx.attempt}"  # the bug: a new key per attempt
        return provider.call(ctx, "charge", key=fresh, amount=amount)

    @charge.compensation
    def refund(ctx: storno.CompensationContext[Any], amount: int) -> None:
        provider.undo(ctx)

    @storno.step(name="notify", kind="noncompensable")
    def notify(ctx: storno.StepContext, amount: int) -> Any:
        return provider.call(ctx, "sms", body=f"charged {amount}")

    @storno.saga(name="careless")
    async def careless(ctx: storno.SagaContext, amount: int) -> None:
        await ctx.step(charge, amount)
        await ctx.step(notify, amount)

    with pytest.raises(FaultScheduleError) as failed:
        await check_fault_schedules(
            careless,
            [100],
            provider=provider,
            steps=[charge, notify],
            schedules=[Schedule((Fault("drop", "charge"),))],
        )
    text = str(failed.value)
    assert "charge of step #0 applied 2 times, under different keys" in text
    assert "reproduce one: check_fault_schedules(..., schedules=[Schedule(" in text


async def test_it_finds_a_compensation_that_skips_unknown_outcomes(tmp_path: Path) -> None:
    provider = FakeProvider(tmp_path / "ledger.db", OPS)

    @storno.step(name="charge")
    def charge(ctx: storno.StepContext, amount: int) -> Any:
        return provider.call(ctx, "charge", amount=amount)

    @charge.compensation
    def refund(ctx: storno.CompensationContext[Any], amount: int) -> None:
        if ctx.result is not storno.UNKNOWN:  # the bug: an unknown outcome may be a charge
            provider.undo(ctx)

    @storno.saga(name="trusting")
    async def trusting(ctx: storno.SagaContext, amount: int) -> None:
        await ctx.step(charge, amount)

    # Every answer is lost: the charge's outcome stays unknown and it is compensated.
    with pytest.raises(FaultScheduleError) as failed:
        await check_fault_schedules(
            trusting, [5], provider=provider, steps=[charge], schedules=3, seed=11,
            draw=lambda rng, ops, steps: Schedule((Fault("drop", "charge", times=9),)),
        )  # fmt: skip
    report = failed.value.report
    assert report.seed == 11 and len(report.failures) == 3
    assert "left in place after compensation: charge of step #0" in str(failed.value)
    assert "(seed 11)" in str(failed.value)
    assert "reproduce one: check_fault_schedules(..., seed=11, only=[0])" in str(failed.value)


# --- check_failure_points with waits -----------------------------------------------------


async def test_check_failure_points_answers_signals_and_approvals(tmp_path: Path) -> None:
    provider = FakeProvider(tmp_path / "ledger.db", OPS)

    @storno.step(name="hold", verify=lambda ctx, amount: provider.lookup(ctx, "charge"))
    def hold(ctx: storno.StepContext, amount: int) -> Any:
        return provider.call(ctx, "charge", amount=amount)

    @hold.compensation
    def release(ctx: storno.CompensationContext[Any], amount: int) -> None:
        provider.undo(ctx, "release")

    @storno.step(name="confirm", kind="noncompensable")
    def confirm(ctx: storno.StepContext, amount: int, note: str) -> Any:
        return provider.call(ctx, "sms", body=f"{amount}: {note}")

    @storno.saga(name="approved_hold")
    async def approved_hold(ctx: storno.SagaContext, amount: int) -> str:
        await ctx.step(hold, amount)
        note = await ctx.wait_for_signal("note")
        approval = await ctx.wait_for_approval()
        await ctx.step(confirm, amount, f"{note} ({approval.by})")
        return str(note)

    report = await check_failure_points(
        approved_hold,
        [300],
        effects=provider.effects,
        steps=[hold, confirm],
        signals={"note": "ok by phone"},
        approve=True,
        folder=tmp_path / "points",
    )
    assert report.ok and len(report.scenarios) >= 5, report.summary()
    body = ("sms", ("body", "300: ok by phone (storno-testing)"))
    assert report.baseline == {("charge", ("amount", 300)): 1, body: 1}

    # A rejection compensates the hold; every scenario must still end consistent.
    decided: list[str] = []

    def reject(info: storno.RunInfo) -> bool:
        decided.append(info.run_id)
        return False

    with pytest.raises(AssertionError, match="clean run .* must complete"):
        await check_failure_points(
            approved_hold, [300], effects=provider.effects, steps=[hold, confirm],
            signals={"note": "x"}, approve=reject, folder=tmp_path / "rejected", timeout=10,
        )  # fmt: skip
    assert decided  # asked, once the run waited for it


async def test_waits_are_answered_only_once_the_run_waits(tmp_path: Path) -> None:
    """An approval sent before the run asks may be refused: the check sends it after."""
    sent: list[str] = []

    @storno.step(name="log_it", kind="retryable")
    def log_it(ctx: storno.StepContext) -> None:
        sent.append("step")

    @storno.saga(name="late_asker")
    async def late_asker(ctx: storno.SagaContext) -> None:
        await ctx.step(log_it)
        await ctx.sleep(3600)  # skipped in virtual time
        await ctx.wait_for_approval()

    seen: list[str] = []

    def listen(record: Any, events: list[Any]) -> None:
        seen.extend(e.type.value for e in events)

    async def effects() -> list[str]:
        return []

    def make_app(url: str) -> storno.Storno:
        from storno.testing import VirtualClock

        made = storno.Storno(url, sagas=[late_asker], steps=[log_it], clock=VirtualClock())
        made.add_listener(listen)
        return made

    report = await check_failure_points(
        late_asker, effects=effects, make_app=make_app, approve=True, folder=tmp_path / "p"
    )
    assert report.ok, report.summary()
    start = seen.index("signal_wait_started")
    assert "signal_received" in seen[start:]
    assert "signal_received" not in seen[:start]


def test_testing_exports_are_pinned() -> None:
    import storno.testing

    assert set(storno.testing.__all__) == {
        "VirtualClock", "advance", "FaultInjector", "FaultRule", "Injection", "SimulatedCrash",
        "restart_worker", "restart_workers", "check_failure_points", "FailurePointReport",
        "FailurePointError", "ScenarioOutcome", "EffectsReader", "Approve", "FakeProvider",
        "Effect", "ProviderError", "ProviderUnavailable", "ProviderThrottled", "ProviderTimeout",
        "ProviderConflict", "Declined", "Schedule", "Fault", "Outage", "Crash",
        "random_schedule", "check_fault_schedules", "FaultScheduleReport", "FaultScheduleError",
        "ScheduleOutcome",
    }  # fmt: skip
    assert len(storno.testing.__all__) == len(set(storno.testing.__all__))
    for name in storno.testing.__all__:
        assert hasattr(storno.testing, name), name
