"""Unknown outcomes stay unknown until they are settled (rules 3 and 5 of the contract).

A provider here honours idempotency keys but answers 429 and 500 *before* it looks at the key,
as many do: such an answer says nothing about an earlier attempt whose answer was lost.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import storno
from test_cli import cli

FAST = storno.RetryPolicy(initial_interval=0.001, maximum_interval=0.01, maximum_attempts=4)


class ServerError(Exception):
    """An HTTP 500 that came before the provider looked at the key."""


class RateLimited(Exception):
    """An HTTP 429 with its Retry-After, also before the key check."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"429 Too Many Requests (Retry-After: {retry_after})")
        self.retry_after = retry_after


class CardDeclined(Exception):
    """The provider's replayed decline under the same key: proof the charge did not land."""


@dataclass
class Provider:
    """Charges, refunds and messages by idempotency key; faults are scripted per call."""

    charges: dict[str, int] = field(default_factory=dict)
    refunds: dict[str, str] = field(default_factory=dict)  # refund key -> charge key
    messages: dict[str, str] = field(default_factory=dict)
    script: list[str] = field(default_factory=list)  # one fault per call: "", "lost", "500"...
    up: bool = True  # reads (verify) fail while down
    calls: int = 0

    def _fault(self) -> str:
        self.calls += 1
        return self.script.pop(0) if self.script else ""

    def charge(self, key: str, amount: int) -> str:
        fault = self._fault()
        if fault == "500":
            raise ServerError("500 Internal Server Error")
        if fault == "429":
            raise RateLimited(0.001)
        if fault == "declined":
            raise CardDeclined("card declined (replayed under the same key)")
        if fault == "declined-lost":
            raise storno.OutcomeUnknownError("connection reset; the card was in fact declined")
        self.charges.setdefault(key, amount)
        if fault == "lost":
            raise storno.OutcomeUnknownError("connection reset after the request was sent")
        return f"ch-{key[-6:]}"

    def post(self, key: str, text: str) -> str:
        fault = self._fault()
        if fault == "500":
            raise ServerError("500 Internal Server Error")
        if fault == "500-lost":  # the message never went out, but its answer was lost
            raise storno.OutcomeUnknownError("read timeout")
        self.messages.setdefault(key, text)
        if fault == "lost":
            raise storno.OutcomeUnknownError("read timeout")
        return f"msg-{key[-6:]}"

    def find_charge(self, key: str) -> object:
        if not self.up:
            raise ConnectionError("provider unreachable")
        return f"ch-{key[-6:]}" if key in self.charges else storno.NOT_APPLIED

    def refund(self, refund_key: str, charge_key: str) -> None:
        if charge_key in self.charges:  # nothing to refund when the charge never landed
            self.refunds.setdefault(refund_key, charge_key)

    def balance(self) -> int:
        refunded = set(self.refunds.values())
        return sum(a for k, a in self.charges.items() if k not in refunded)


@pytest.fixture
def provider() -> Provider:
    return Provider()


def charge_step(provider: Provider, *, verify: bool, **options: Any) -> storno.Step[..., str]:
    def find(ctx: storno.StepContext, amount: int) -> object:
        return provider.find_charge(ctx.idempotency_key)

    options.setdefault("retry", FAST)

    @storno.step(kind="compensable", verify=find if verify else None, **options)
    def charge(ctx: storno.StepContext, amount: int) -> str:
        return provider.charge(ctx.idempotency_key, amount)

    @charge.compensation
    def refund(ctx: storno.CompensationContext[str], amount: int) -> None:
        provider.refund(ctx.idempotency_key, ctx.forward_key)  # by key: copes with UNKNOWN

    return charge


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
async def test_lost_charge_then_429_and_500_is_still_refunded(
    db_url: str, provider: Provider, verify: bool
):
    provider.script = ["lost", "429", "500", "500"]
    provider.up = False  # the read-back fails too
    charge = charge_step(provider, verify=verify)

    @storno.saga
    async def pay(ctx: storno.SagaContext, amount: int) -> str:
        return await ctx.step(charge, amount)

    async with storno.Storno(db_url, sagas=[pay]) as app, app.worker():
        handle = await app.start(pay, 100)
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=20)
        info = await handle.describe()
    assert len(provider.charges) == 1
    assert provider.balance() == 0, "the charge landed and was never refunded"
    step = info.steps[0]
    assert step.outcome_unknown and step.status == "unknown"
    assert step.compensation is not None and step.compensation.status == "completed"


async def test_lost_slack_message_then_500s_parks_the_run_instead_of_compensating(
    db_url: str, provider: Provider
):
    charge = charge_step(provider, verify=True)

    @storno.step(kind="noncompensable", retry=FAST)
    def post_slack(ctx: storno.StepContext, text: str) -> str:
        return provider.post(ctx.idempotency_key, text)

    @storno.saga
    async def invoice(ctx: storno.SagaContext, amount: int) -> None:
        await ctx.step(charge, amount)
        await ctx.step(post_slack, "invoice sent")

    provider.script = ["", "lost", "500", "500", "500"]
    async with storno.Storno(db_url, sagas=[invoice]) as app, app.worker():
        handle = await app.start(invoice, 100)
        with pytest.raises(storno.NeedsAttentionError) as caught:
            await handle.result(timeout=20)
        info = await handle.describe()
    assert provider.messages, "the message went out"
    assert provider.refunds == {}, "the charge was refunded although the message said sent"
    assert info.status is storno.RunStatus.NEEDS_ATTENTION
    message = str(caught.value)
    assert "post_slack" in message and "unknown" in message
    assert "storno retry" in message and "storno resolve" in message
    assert info.steps[1].status == "unknown"


async def test_declared_not_applied_error_settles_the_unknown_outcome(
    db_url: str, provider: Provider
):
    provider.script = ["declined-lost", "declined"]
    retry = storno.RetryPolicy(initial_interval=0.001, non_retryable=(CardDeclined,))
    charge = charge_step(provider, verify=False, retry=retry, not_applied_on=(CardDeclined,))

    @storno.saga
    async def pay(ctx: storno.SagaContext, amount: int) -> str:
        return await ctx.step(charge, amount)

    async with storno.Storno(db_url, sagas=[pay]) as app, app.worker():
        handle = await app.start(pay, 100)
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=20)
        info = await handle.describe()
    step = info.steps[0]
    # A declared decline under the same key proves the call did not take effect: nothing to
    # compensate, and the step is not shown as unknown.
    assert not step.outcome_unknown and step.status == "failed"
    assert step.compensation is None
    failed = [e for e in info.history if e.type == "attempt_failed"]
    assert [e.data["outcome_unknown"] for e in failed] == [True, False]


async def test_a_retry_that_returns_settles_the_unknown_outcome(db_url: str, provider: Provider):
    provider.script = ["lost", "500", ""]
    charge = charge_step(provider, verify=False)

    @storno.saga
    async def pay(ctx: storno.SagaContext, amount: int) -> str:
        return await ctx.step(charge, amount)

    async with storno.Storno(db_url, sagas=[pay]) as app, app.worker():
        assert (await app.run(pay, 100)).startswith("ch-")
        info = await app.describe((await app.list_runs())[0].run_id)
    failed = [e.data["outcome_unknown"] for e in info.history if e.type == "attempt_failed"]
    assert failed == [True, True]  # the 500 did not settle it; the returning retry did
    assert info.steps[0].status == "completed" and not info.steps[0].outcome_unknown


async def test_sync_step_past_its_attempt_timeout_is_waited_for_before_read_back(
    db_url: str, provider: Provider
):
    release = threading.Event()
    verified_while_running: list[bool] = []
    running = threading.Event()

    def find(ctx: storno.StepContext, amount: int) -> object:
        verified_while_running.append(running.is_set())
        return provider.find_charge(ctx.idempotency_key)

    @storno.step(
        kind="compensable",
        retry=FAST,
        verify=find,
        attempt_timeout=0.05,
        thread_grace=10,
    )
    def charge(ctx: storno.StepContext, amount: int) -> str:
        running.set()
        release.wait(10)
        time.sleep(0.05)
        provider.charges[ctx.idempotency_key] = amount  # lands after the engine stopped waiting
        running.clear()
        return "late"

    @charge.compensation
    def refund(ctx: storno.CompensationContext[str], amount: int) -> None:
        provider.refund(ctx.idempotency_key, ctx.forward_key)

    @storno.saga
    async def pay(ctx: storno.SagaContext, amount: int) -> str:
        return await ctx.step(charge, amount)

    async with storno.Storno(db_url, sagas=[pay]) as app, app.worker():
        handle = await app.start(pay, 100)
        deadline = time.monotonic() + 10
        while not any(e.data.get("still_running") for e in (await handle.describe()).history):
            assert time.monotonic() < deadline, "the attempt never timed out"
            await asyncio.sleep(0.01)
        release.set()
        result = await handle.result(timeout=20)
        info = await handle.describe()
    # The engine waited for the thread and took its answer; it never asked the provider
    # while the call was still in flight, and never charged twice.
    assert result == "late"
    assert True not in verified_while_running
    assert len(provider.charges) == 1 and provider.refunds == {}
    assert info.steps[0].attempts == 1
    late = [e for e in info.history if e.type == "step_completed"]
    assert late and late[0].data.get("late")


async def test_sync_step_outliving_its_grace_stays_unknown(db_url: str, provider: Provider):
    release = threading.Event()

    @storno.step(
        kind="noncompensable",
        retry=storno.RetryPolicy(maximum_attempts=1),
        attempt_timeout=0.05,
        thread_grace=0.1,
    )
    def post_slack(ctx: storno.StepContext, text: str) -> str:
        release.wait(10)
        return "posted"

    @storno.saga
    async def notify(ctx: storno.SagaContext) -> str:
        return await ctx.step(post_slack, "hi")

    try:
        async with storno.Storno(db_url, sagas=[notify]) as app, app.worker():
            handle = await app.start(notify)
            with pytest.raises(storno.NeedsAttentionError) as caught:
                await handle.result(timeout=20)
    finally:
        release.set()
    assert "may still land" in str(caught.value) or "still running" in str(caught.value)


async def test_retry_later_is_honoured_within_the_maximum_interval(db_url: str):
    calls: list[float] = []
    clock_start = time.monotonic()

    @storno.step(
        kind="retryable",
        retry=storno.RetryPolicy(initial_interval=0.001, maximum_interval=0.3, jitter=0),
    )
    def fetch(ctx: storno.StepContext) -> int:
        calls.append(time.monotonic() - clock_start)
        if len(calls) == 1:
            raise storno.RetryLater(0.2, "429 Too Many Requests")
        if len(calls) == 2:
            raise RateLimited(60)  # capped at the policy's maximum interval
        if len(calls) == 3:
            raise RateLimited(datetime.now(UTC) + timedelta(seconds=0.1))
        return len(calls)

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(fetch)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        handle = await app.start(s)
        assert await handle.result(timeout=20) == 4
        info = await handle.describe()
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.3 and gaps[2] >= 0.05
    waits = [e.data.get("retry_after") for e in info.history if e.type == "attempt_failed"]
    assert waits[0] == pytest.approx(0.2) and waits[1] == pytest.approx(60)


@storno.step(kind="compensable", compensate=lambda ctx: None)
def refused(ctx: storno.StepContext) -> None:
    raise storno.TerminalError("no")


def then_fail(step: storno.Step[[], str]) -> storno.Saga[[], None]:
    """A saga that calls ``step``, then fails for good: ``step`` is compensated."""

    @storno.saga(name=f"then_fail_{step.name}")
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(step)
        await ctx.step(refused)

    return s


async def test_compensation_retry_honours_non_retryable(db_url: str):
    attempts: list[int] = []

    class Gone(Exception):
        pass

    @storno.step(
        kind="compensable",
        compensation_retry=storno.RetryPolicy(
            initial_interval=0.001, maximum_attempts=5, non_retryable=(Gone,)
        ),
    )
    def book(ctx: storno.StepContext) -> str:
        return "b"

    @book.compensation
    def unbook(ctx: storno.CompensationContext[str]) -> None:
        attempts.append(ctx.attempt)
        raise Gone("the booking system refuses for good")

    s = then_fail(book)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.CompensationFailedError):
            await app.run(s)
    assert attempts == [1]


async def test_compensation_timeout_bounds_a_compensation_attempt(db_url: str):
    attempts: list[int] = []

    @storno.step(
        kind="compensable",
        attempt_timeout=30,
        compensation_timeout=0.05,
        compensation_retry=storno.RetryPolicy(initial_interval=0.001, maximum_attempts=3),
    )
    async def book(ctx: storno.StepContext) -> str:
        return "b"

    @book.compensation
    async def unbook(ctx: storno.CompensationContext[str]) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.sleep(30)

    s = then_fail(book)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError):
            await asyncio.wait_for(app.run(s), 10)
    assert attempts == [1, 2]


# --- a way out of needs_attention ---------------------------------------------------------


def invoice_saga(provider: Provider) -> tuple[storno.Saga[..., None], list[storno.Step[..., Any]]]:
    charge = charge_step(provider, verify=True)

    @storno.step(kind="noncompensable", retry=FAST)
    def post_slack(ctx: storno.StepContext, text: str) -> str:
        return provider.post(ctx.idempotency_key, text)

    @storno.saga
    async def invoice(ctx: storno.SagaContext, amount: int) -> None:
        await ctx.step(charge, amount)
        await ctx.step(post_slack, "invoice sent")

    return invoice, [charge, post_slack]


async def _parked_run(app: storno.Storno, saga: storno.Saga[..., None]) -> str:
    handle = await app.start(saga, 100)
    with pytest.raises(storno.NeedsAttentionError):
        await handle.result(timeout=20)
    return handle.run_id


async def test_parked_run_compensated_only_with_the_operators_assertion(
    db_url: str, provider: Provider
):
    saga, steps = invoice_saga(provider)
    provider.script = ["", "500-lost", "500", "500", "500"]
    async with storno.Storno(db_url, sagas=[saga], steps=steps) as app, app.worker():
        run_id = await _parked_run(app, saga)
        with pytest.raises(storno.RunStateError, match=r"--outcome post_slack=not_applied"):
            await app.compensate(run_id, by="ops")
        with pytest.raises(storno.ConfigurationError, match="no step 'nope'"):
            await app.compensate(run_id, by="ops", not_applied=["nope"])
        with pytest.raises(storno.ConfigurationError, match="recorded as completed"):
            await app.compensate(run_id, by="ops", not_applied=["charge"])
        await app.compensate(
            run_id, by="ops", note="no message in the channel", not_applied=["post_slack"]
        )
        with pytest.raises(storno.RunCompensatedError):
            await app.get_handle(run_id).result(timeout=20)
        info = await app.describe(run_id)
    assert provider.balance() == 0 and len(provider.refunds) == 1
    action = next(e for e in info.history if e.type == "operator_action")
    assert action.data["not_applied"] == [1] and action.data["by"] == "ops"
    assert action.data["note"] == "no message in the channel"


async def test_parked_run_retried_goes_forward_under_the_same_key(db_url: str, provider: Provider):
    saga, steps = invoice_saga(provider)
    provider.script = ["", "lost", "500", "500", "500"]
    async with storno.Storno(db_url, sagas=[saga], steps=steps) as app, app.worker():
        run_id = await _parked_run(app, saga)
        with pytest.raises(storno.RunStateError, match="parked for a person"):
            await app.cancel(run_id, by="ops", reason="give up")
        await app.retry(run_id, by="ops", note="Slack is back")
        await app.get_handle(run_id).result(timeout=20)
        info = await app.describe(run_id)
    assert len(provider.messages) == 1 and provider.refunds == {}
    slack = info.steps[1]
    assert slack.status == "completed" and slack.attempts == 5  # numbering goes on
    keys = {e.data["key"] for e in info.history if e.type == "step_started" and e.position == 1}
    assert len(keys) == 1


async def test_parked_run_resolved_by_hand_says_how_it_ended(db_url: str, provider: Provider):
    saga, steps = invoice_saga(provider)
    provider.script = ["", "lost", "500", "500", "500"]
    async with storno.Storno(db_url, sagas=[saga], steps=steps) as app, app.worker():
        run_id = await _parked_run(app, saga)
        with pytest.raises(storno.ConfigurationError, match="outcome='completed'"):
            await app.resolve(run_id, by="ops", note="checked")
        await app.resolve(run_id, by="ops", note="message was posted", outcome="completed")
        assert (await app.describe(run_id)).status is storno.RunStatus.COMPLETED
        with pytest.raises(storno.RunStateError, match="needs a person"):
            await app.retry(run_id, by="ops")


@pytest.mark.sqlite_only
async def test_operator_commands_for_a_parked_run(tmp_path: Path, provider: Provider):
    url = f"sqlite:///{tmp_path / 'parked.db'}"
    saga, steps = invoice_saga(provider)
    provider.script = ["", "500-lost", "500", "500", "500", "", "lost", "500", "500", "500"]
    async with storno.Storno(url, sagas=[saga], steps=steps) as app, app.worker():
        first, second = await _parked_run(app, saga), await _parked_run(app, saga)
    db = ("--db", url)
    parked = (await asyncio.to_thread(cli, "show", first, *db, cwd=tmp_path)).stdout
    assert "post_slack  noncompensable unknown" in parked
    assert "x attempt 2 failed: test_unknown_outcomes.ServerError" in parked
    assert "the outcome stays unknown" in parked
    refused = await asyncio.to_thread(cli, "compensate", first, *db, cwd=tmp_path)
    assert refused.returncode == 1 and "--outcome post_slack=not_applied" in refused.stderr
    bad = await asyncio.to_thread(
        cli, "compensate", first, "--outcome", "post_slack", *db, cwd=tmp_path
    )
    assert bad.returncode == 2 and "STEP=not_applied" in bad.stderr
    done = await asyncio.to_thread(
        cli, "compensate", first, "--outcome", "post_slack=not_applied", "--note", "checked",
        "--by", "maria", *db, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    unsaid = await asyncio.to_thread(cli, "resolve", second, "--note", "posted", *db, cwd=tmp_path)
    assert unsaid.returncode == 1 and "--as completed" in unsaid.stderr
    resolved = await asyncio.to_thread(
        cli, "resolve", second, "--note", "posted", "--as", "completed", *db, cwd=tmp_path
    )
    assert resolved.returncode == 0, resolved.stderr
    async with storno.Storno(url, sagas=[saga], steps=steps) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError):
            await app.get_handle(first).result(timeout=20)
        assert (await app.describe(second)).status is storno.RunStatus.COMPLETED
    shown = await asyncio.to_thread(cli, "show", first, *db, cwd=tmp_path)
    assert "compensate by maria" in shown.stdout


async def test_verify_timeout_bounds_a_read_back_without_inheriting_attempt_timeout(
    db_url: str, provider: Provider
):
    async def slow_find(ctx: storno.StepContext, amount: int) -> object:
        await asyncio.sleep(30)
        return storno.NOT_APPLIED

    @storno.step(
        kind="compensable",
        retry=storno.RetryPolicy(initial_interval=0.001, maximum_attempts=2),
        verify=slow_find,
        attempt_timeout=30,
        verify_timeout=0.05,
    )
    def charge(ctx: storno.StepContext, amount: int) -> str:
        return provider.charge(ctx.idempotency_key, amount)

    @charge.compensation
    def refund(ctx: storno.CompensationContext[str], amount: int) -> None:
        provider.refund(ctx.idempotency_key, ctx.forward_key)

    @storno.saga
    async def pay(ctx: storno.SagaContext, amount: int) -> str:
        return await ctx.step(charge, amount)

    provider.script = ["lost", ""]
    async with storno.Storno(db_url, sagas=[pay]) as app, app.worker():
        handle = await app.start(pay, 100)
        assert (await asyncio.wait_for(handle.result(), 10)).startswith("ch-")
        info = await handle.describe()
    failed = [e for e in info.history if e.type == "outcome_unknown"]
    assert failed and failed[0].data["reason"] == "read-back failed"
    assert failed[0].data["error"]["type"] == "TimeoutError"
    assert len(provider.charges) == 1


async def test_a_compensation_can_ask_to_be_retried_later(db_url: str):
    times: list[float] = []

    @storno.step(
        kind="compensable",
        compensation_retry=storno.RetryPolicy(initial_interval=0.001, maximum_interval=1),
    )
    def book(ctx: storno.StepContext) -> str:
        return "b"

    @book.compensation
    def unbook(ctx: storno.CompensationContext[str]) -> None:
        times.append(time.monotonic())
        if ctx.attempt == 1:
            raise storno.RetryLater(timedelta(seconds=0.2))

    s = then_fail(book)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        handle = await app.start(s)
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=10)
        info = await handle.describe()
    assert len(times) == 2 and times[1] - times[0] >= 0.2
    failed = [e for e in info.history if e.type == "compensation_attempt_failed"]
    assert failed[0].data["retry_after"] == pytest.approx(0.2)


# --- found in review: each failed before its fix -------------------------------------------


async def test_a_client_read_timeout_is_a_lost_answer(db_url: str, provider: Provider):
    httpx = pytest.importorskip("httpx")

    @storno.step(kind="compensable", retry=storno.RetryPolicy(maximum_attempts=1))
    def charge(ctx: storno.StepContext, amount: int) -> str:
        provider.charges[ctx.idempotency_key] = amount  # the write lands ...
        raise httpx.ReadTimeout("timed out reading the response")  # ... the answer does not

    @charge.compensation
    def refund(ctx: storno.CompensationContext[str], amount: int) -> None:
        provider.refund(ctx.idempotency_key, ctx.forward_key)

    @storno.saga
    async def pay(ctx: storno.SagaContext, amount: int) -> str:
        return await ctx.step(charge, amount)

    async with storno.Storno(db_url, sagas=[pay]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError):
            await app.run(pay, 100)
    assert provider.balance() == 0, "the charge whose answer timed out was never refunded"


async def test_every_timed_out_thread_is_waited_for_not_only_the_last(
    db_url: str, provider: Provider
):
    first_lands, second_ends = threading.Event(), threading.Event()
    calls: list[int] = []

    def find(ctx: storno.StepContext, amount: int) -> object:
        return provider.find_charge(ctx.idempotency_key)

    @storno.step(
        kind="compensable",
        retry=storno.RetryPolicy(initial_interval=0.001, maximum_attempts=3, jitter=0),
        verify=find,
        attempt_timeout=0.05,
        thread_grace=0.05,
    )
    def charge(ctx: storno.StepContext, amount: int) -> str:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            first_lands.wait(10)
            provider.charges[ctx.idempotency_key] = amount
            return "late"
        if len(calls) == 2:
            second_ends.wait(10)
            raise ServerError("502")
        second_ends.set()
        raise ServerError("500")

    @charge.compensation
    def refund(ctx: storno.CompensationContext[str], amount: int) -> None:
        provider.refund(ctx.idempotency_key, ctx.forward_key)

    @storno.saga
    async def pay(ctx: storno.SagaContext, amount: int) -> str:
        return await ctx.step(charge, amount)

    try:
        async with storno.Storno(db_url, sagas=[pay]) as app, app.worker():
            handle = await app.start(pay, 100)
            with pytest.raises(storno.RunCompensatedError):
                await handle.result(timeout=20)
            info = await handle.describe()
    finally:
        first_lands.set()
    # The first call was still in flight: its read-back's "not applied" was not believed.
    assert not any(e.type == "verified" and not e.data["applied"] for e in info.history)
    assert info.steps[0].compensation is not None
    assert info.steps[0].compensation.status == "completed"


async def test_a_read_back_that_started_while_the_call_ran_is_not_believed(
    db_url: str, provider: Provider
):
    verifying = threading.Event()
    calls: list[int] = []

    def find(ctx: storno.StepContext, amount: int) -> object:
        seen = ctx.idempotency_key in provider.charges
        if ctx.attempt >= 2:
            verifying.set()
            time.sleep(0.2)  # the call lands while this answer is on its way
        return "found" if seen else storno.NOT_APPLIED

    @storno.step(
        kind="compensable",
        retry=storno.RetryPolicy(initial_interval=0.001, maximum_attempts=2, jitter=0),
        verify=find,
        attempt_timeout=0.05,
        thread_grace=0.05,
    )
    def charge(ctx: storno.StepContext, amount: int) -> str:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            verifying.wait(10)
            provider.charges[ctx.idempotency_key] = amount
            return "late"
        raise ServerError("500")

    @charge.compensation
    def refund(ctx: storno.CompensationContext[str], amount: int) -> None:
        provider.refund(ctx.idempotency_key, ctx.forward_key)

    @storno.saga
    async def pay(ctx: storno.SagaContext, amount: int) -> str:
        return await ctx.step(charge, amount)

    async with storno.Storno(db_url, sagas=[pay]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError):
            await asyncio.wait_for(app.run(pay, 100), 20)
    assert provider.balance() == 0, "the charge that landed during the read-back was kept"


async def test_a_run_its_deadline_parked_is_retried_without_it(db_url: str):
    state = {"down": True}

    @storno.step(kind="pivot")
    def capture(ctx: storno.StepContext) -> str:
        return "captured"

    @storno.step(
        kind="retryable",
        retry=storno.RetryPolicy(initial_interval=0.05, maximum_interval=0.05),
    )
    def notify(ctx: storno.StepContext) -> str:
        if state["down"]:
            raise ServerError("503")
        return "sent"

    @storno.saga
    async def order(ctx: storno.SagaContext) -> str:
        await ctx.step(capture)
        return await ctx.step(notify)

    async with storno.Storno(db_url, sagas=[order]) as app, app.worker():
        handle = await app.start(order.options(timeout=0.3))
        with pytest.raises(storno.NeedsAttentionError):
            await handle.result(timeout=10)
        state["down"] = False
        await app.retry(handle.run_id, by="ops", note="the mail API is back")
        assert await handle.result(timeout=10) == "sent"
        info = await handle.describe()
    action = next(e for e in info.history if e.type == "operator_action")
    assert action.data["deadline_lifted"]


async def test_the_park_names_the_unknown_step_after_a_completed_pivot(db_url: str):
    calls: list[int] = []

    @storno.step(kind="pivot")
    def capture(ctx: storno.StepContext) -> str:
        return "ok"

    @storno.step(kind="noncompensable", retry=FAST)
    def post(ctx: storno.StepContext) -> None:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            raise storno.OutcomeUnknownError("read timeout")
        raise ServerError("500")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(capture)
        await ctx.step(post)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.NeedsAttentionError) as caught:
            await app.run(s)
    error = caught.value.error or {}
    assert (error.get("step"), error.get("reason")) == ("post", "outcome_unknown")
    assert str(caught.value).count("step 'post' (#1, noncompensable) may have taken effect") == 1
    assert "storno compensate" not in str(caught.value)  # refused past a completed pivot


async def test_an_operators_compensation_replaces_the_parks_error(db_url: str, provider: Provider):
    saga, steps = invoice_saga(provider)
    provider.script = ["", "500-lost", "500", "500", "500"]
    async with storno.Storno(db_url, sagas=[saga], steps=steps) as app, app.worker():
        run_id = await _parked_run(app, saga)
        await app.compensate(run_id, by="ops", note="checked #billing", not_applied=["post_slack"])
        with pytest.raises(storno.RunCompensatedError) as caught:
            await app.get_handle(run_id).result(timeout=20)
    assert "compensated by ops: checked #billing" in str(caught.value)
    assert "will not compensate" not in str(caught.value)
