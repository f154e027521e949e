"""The forward path: steps, keys, retries, unknown outcomes, timeouts and deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import pytest

import storno
from storno._model import forward_key

FAST = storno.RetryPolicy(initial_interval=0.001, maximum_interval=0.01, maximum_attempts=5)


@dataclass
class Ledger:
    """What the other systems saw: every call with its idempotency key."""

    calls: list[tuple[str, str, object]]

    def keys(self, step: str) -> list[str]:
        return [key for name, key, _ in self.calls if name == step]


@pytest.fixture
def ledger() -> Ledger:
    return Ledger([])


async def test_async_and_sync_steps_complete_with_structural_keys(db_url: str, ledger: Ledger):
    @storno.step(kind="retryable")
    async def reserve(ctx: storno.StepContext, item: str) -> str:
        ledger.calls.append(("reserve", ctx.idempotency_key, ctx.run_id))
        return f"r-{item}"

    @storno.step(kind="retryable")
    def confirm(ctx: storno.StepContext, reservation: str, *, note: str = "") -> dict[str, str]:
        ledger.calls.append(("confirm", ctx.idempotency_key, threading.current_thread().name))
        return {"confirmed": reservation, "note": note}

    @storno.saga
    async def order(ctx: storno.SagaContext, item: str) -> dict[str, str]:
        reservation = await ctx.step(reserve, item)
        return await ctx.step(confirm, reservation, note="ok")

    async with storno.Storno(db_url, sagas=[order]) as app, app.worker():
        handle = await app.start(order.options(run_id="run-1"), "book")
        assert await handle.result(timeout=10) == {"confirmed": "r-book", "note": "ok"}
    assert ledger.keys("reserve") == [forward_key("run-1", 0, "reserve")]
    assert ledger.keys("confirm") == [forward_key("run-1", 1, "confirm")]
    assert ledger.calls[1][2].startswith("storno-step")  # a sync step runs off the event loop


async def test_sync_saga_body_runs_in_a_thread(db_url: str):
    @storno.step(kind="retryable")
    async def double(ctx: storno.StepContext, n: int) -> int:
        return n * 2

    @storno.saga
    def arithmetic(ctx: storno.SyncSagaContext, n: int) -> list[object]:
        first = ctx.step(double, n)
        return [ctx.step(double, first), ctx.now().year >= 2024, 0 <= ctx.random() < 1]

    async with storno.Storno(db_url, sagas=[arithmetic]) as app, app.worker():
        assert await app.run(arithmetic, 3) == [12, True, True]


async def test_transient_errors_are_retried_with_the_same_key(db_url: str, ledger: Ledger):
    @storno.step(kind="retryable", retry=FAST)
    def flaky(ctx: storno.StepContext) -> int:
        ledger.calls.append(("flaky", ctx.idempotency_key, ctx.attempt))
        if ctx.attempt < 3:
            raise ConnectionError("provider hiccup")
        return ctx.attempt

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(flaky)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        handle = await app.start(s)
        assert await handle.result(timeout=10) == 3
        info = await handle.describe()
    assert len(set(ledger.keys("flaky"))) == 1
    assert [attempt for _, _, attempt in ledger.calls] == [1, 2, 3]
    step = info.steps[0]
    assert (step.status, step.attempts) == ("completed", 3)
    kinds = [e.type for e in info.history]
    assert kinds.count("attempt_failed") == 2
    assert kinds.count("step_started") == 3


async def test_terminal_and_non_retryable_errors_end_the_forward_path_at_once(db_url: str):
    calls: list[str] = []

    class Declined(Exception):
        pass

    @storno.step(kind="pivot", retry=storno.RetryPolicy(non_retryable=(Declined,)))
    def charge(ctx: storno.StepContext, how: str) -> None:
        calls.append(how)
        if how == "terminal":
            raise storno.TerminalError("card declined for good")
        raise Declined("insufficient funds")

    @storno.saga
    async def s(ctx: storno.SagaContext, how: str) -> None:
        await ctx.step(charge, how)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        for how in ("terminal", "declined"):
            with pytest.raises(storno.RunCompensatedError) as caught:
                await app.run(s, how)
            assert "terminal error" in str(caught.value)
    assert calls == ["terminal", "declined"]


async def test_exhausted_retries_end_the_forward_path(db_url: str):
    attempts: list[int] = []

    @storno.step(kind="pivot", retry=FAST.__class__(initial_interval=0.001, maximum_attempts=3))
    def down(ctx: storno.StepContext) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError("still down")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(down)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="gave up after 3 attempts"):
            await app.run(s)
    assert attempts == [1, 2, 3]


async def test_backoff_grows_and_stays_within_jitter():
    policy = storno.RetryPolicy(
        initial_interval=1.0, backoff_coefficient=2.0, maximum_interval=5.0, jitter=0.2
    )
    for failed, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        delays = [policy.delay(failed) for _ in range(200)]
        assert min(delays) >= base * 0.8 - 1e-9
        assert max(delays) <= base * 1.2 + 1e-9
        assert max(delays) - min(delays) > 0  # jitter really spreads retries
    assert storno.RetryPolicy(jitter=0).delay(2) == 2.0
    with pytest.raises(storno.ConfigurationError, match="maximum_attempts"):
        storno.RetryPolicy(maximum_attempts=0)
    with pytest.raises(storno.ConfigurationError, match="backoff_coefficient"):
        storno.RetryPolicy(backoff_coefficient=0.5)


async def test_retry_policy_can_be_overridden_at_the_call_site(db_url: str):
    attempts: list[int] = []

    @storno.step(kind="pivot", retry=storno.RetryPolicy(maximum_attempts=1))
    def once(ctx: storno.StepContext) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionError("hiccup")
        return ctx.attempt

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(once.options(retry=FAST))

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        assert await app.run(s) == 2
    assert once.retry.maximum_attempts == 1  # the declaration itself is unchanged


async def test_unknown_outcome_is_read_back_before_any_retry(db_url: str):
    provider: dict[str, str] = {}
    calls: list[str] = []

    def read_back(ctx: storno.StepContext, amount: int) -> object:
        return provider.get(ctx.idempotency_key, storno.NOT_APPLIED)

    @storno.step(kind="pivot", verify=read_back, retry=FAST)
    def charge(ctx: storno.StepContext, amount: int) -> str:
        calls.append(ctx.idempotency_key)
        provider[ctx.idempotency_key] = f"ch-{amount}"  # the charge lands...
        raise storno.OutcomeUnknownError("read timeout")  # ...but the answer is lost

    @storno.saga
    async def s(ctx: storno.SagaContext) -> str:
        return await ctx.step(charge, 100)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        handle = await app.start(s)
        assert await handle.result(timeout=10) == "ch-100"
        info = await handle.describe()
    assert len(calls) == 1  # never charged twice
    assert info.steps[0].verified == [True]
    assert "verified" in [e.type for e in info.history]


async def test_read_back_that_finds_nothing_retries_with_the_same_key(db_url: str):
    calls: list[str] = []

    @storno.step(kind="pivot", retry=FAST, verify=lambda ctx, amount: storno.NOT_APPLIED)
    def charge(ctx: storno.StepContext, amount: int) -> str:
        calls.append(ctx.idempotency_key)
        if len(calls) == 1:
            raise storno.OutcomeUnknownError("connection reset before the request was sent")
        return "ch-1"

    @storno.saga
    async def s(ctx: storno.SagaContext) -> str:
        return await ctx.step(charge, 100)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        handle = await app.start(s)
        assert await handle.result(timeout=10) == "ch-1"
        assert (await handle.describe()).steps[0].verified == [False]
    assert len(calls) == 2 and calls[0] == calls[1]


async def test_attempt_timeout_makes_the_outcome_unknown_and_retries_same_key(db_url: str):
    keys: list[str] = []

    @storno.step(kind="pivot", attempt_timeout=0.05, retry=FAST)
    async def slow_then_fast(ctx: storno.StepContext) -> int:
        keys.append(ctx.idempotency_key)
        if ctx.attempt == 1:
            await asyncio.sleep(5)
        return ctx.attempt

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(slow_then_fast)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        handle = await app.start(s)
        assert await handle.result(timeout=10) == 2
        info = await handle.describe()
    assert len(keys) == 2 and keys[0] == keys[1]
    failed = [e for e in info.history if e.type == "attempt_failed"]
    assert failed[0].data["outcome_unknown"] is True


async def test_step_timeout_over_all_attempts_ends_the_forward_path(db_url: str):
    seen: list[object] = []

    @storno.step(
        timeout=0.3,
        attempt_timeout=0.05,
        retry=storno.RetryPolicy(initial_interval=0.01, maximum_attempts=None, jitter=0),
        compensate=lambda ctx: seen.append(ctx.result),
    )
    async def hangs(ctx: storno.StepContext) -> None:
        await asyncio.sleep(5)

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(hangs)

    started = time.monotonic()
    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="step timeout"):
            await app.run(s)
    assert time.monotonic() - started < 5
    # Every attempt timed out, so the call may have landed: it is compensated, blind.
    assert seen == [storno.UNKNOWN]


async def test_pivot_of_unknown_outcome_is_parked_not_compensated(db_url: str):
    compensated: list[str] = []

    @storno.step(compensate=lambda ctx: compensated.append(ctx.step))
    def before(ctx: storno.StepContext) -> None:
        pass

    @storno.step(kind="pivot", attempt_timeout=0.02, retry=FAST)
    async def hangs(ctx: storno.StepContext) -> None:
        await asyncio.sleep(5)

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(before)
        await ctx.step(hangs)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.NeedsAttentionError, match="point of no return"):
            await app.run(s)
    assert compensated == []


async def test_run_deadline_ends_the_forward_path(db_url: str):
    compensated: list[str] = []

    @storno.step(compensate=lambda ctx: compensated.append(ctx.step))
    def first(ctx: storno.StepContext) -> None:
        pass

    @storno.step(
        kind="pivot",
        retry=storno.RetryPolicy(initial_interval=0.02, jitter=0, maximum_attempts=None),
    )
    def never(ctx: storno.StepContext) -> None:
        raise ConnectionError("down")

    @storno.saga(timeout=0.3)
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(first)
        await ctx.step(never)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="run deadline"):
            await app.run(s)
    assert compensated == ["first"]


async def test_recorded_values_are_json_round_tripped(db_url: str):
    @dataclass
    class Quote:
        amount: str
        at: datetime

    @storno.step(kind="retryable")
    def quote(ctx: storno.StepContext, when: datetime) -> tuple[str, bytes]:
        return (when.isoformat(), b"\x00\x01")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> object:
        # Results come back as they will on replay: tuples as lists, bytes as bytes.
        return await ctx.step(quote, ctx.now())

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        result = await app.run(s)
    assert isinstance(result, list) and result[1] == b"\x00\x01"


async def test_unserializable_argument_is_refused_before_the_step_runs(db_url: str):
    called: list[str] = []

    @storno.step(kind="retryable")
    def send(ctx: storno.StepContext, payload: object) -> None:
        called.append("send")

    @storno.saga
    async def s(ctx: storno.SagaContext) -> None:
        await ctx.step(send, object())

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="arguments of step 'send'"):
            await app.run(s)
    assert called == []


async def test_payload_over_the_limit_is_refused_with_its_size(db_url: str):
    @storno.step(kind="retryable")
    def echo(ctx: storno.StepContext, text: str) -> str:
        return text

    @storno.saga
    async def s(ctx: storno.SagaContext, text: str) -> str:
        return await ctx.step(echo, text)

    async with storno.Storno(db_url, sagas=[s], max_payload_bytes=4096) as app:
        with pytest.raises(storno.PayloadTooLargeError, match="over the limit of 4,096 bytes"):
            await app.start(s, "x" * 5000)
        assert await app.list_runs() == []  # nothing was recorded


async def test_bad_step_arguments_are_refused_at_the_call_site(db_url: str):
    @storno.step(kind="retryable")
    def one_arg(ctx: storno.StepContext, a: int) -> int:
        return a

    @storno.saga
    async def s(ctx: storno.SagaContext) -> int:
        return await ctx.step(one_arg, 1, 2)  # type: ignore[call-arg]

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        with pytest.raises(storno.RunCompensatedError, match="step 'one_arg' called with bad"):
            await app.run(s)


async def test_same_run_id_returns_the_existing_run_and_runs_it_once(db_url: str):
    runs: list[str] = []

    @storno.step(kind="retryable")
    def work(ctx: storno.StepContext, amount: float) -> float:
        runs.append(ctx.run_id)
        return amount

    @storno.saga
    async def pay(ctx: storno.SagaContext, amount: float) -> float:
        return await ctx.step(work, amount)

    async with storno.Storno(db_url, sagas=[pay]) as app, app.worker():
        first = await app.start(pay.options(run_id="pay-1"), 100.00)
        again = await app.start(pay.options(run_id="pay-1"), 100.00)
        assert first.run_id == again.run_id == "pay-1"
        assert await again.result(timeout=10) == 100.0
        with pytest.raises(storno.RunConflictError) as caught:
            await app.start(pay.options(run_id="pay-1"), 99.99)
        assert "100.0" in str(caught.value) and "99.99" in str(caught.value)
        assert len(await app.list_runs()) == 1
    assert runs == ["pay-1"]


async def test_result_wait_can_time_out_while_the_run_goes_on(db_url: str):
    gate = asyncio.Event()

    @storno.step(kind="retryable")
    async def wait_gate(ctx: storno.StepContext) -> str:
        await gate.wait()
        return "done"

    @storno.saga
    async def s(ctx: storno.SagaContext) -> str:
        return await ctx.step(wait_gate)

    async with storno.Storno(db_url, sagas=[s]) as app, app.worker():
        handle = await app.start(s)
        with pytest.raises(storno.WaitTimeoutError, match="still running"):
            await handle.result(timeout=0.1)
        gate.set()
        assert await handle.result(timeout=10) == "done"


async def test_run_started_without_a_local_worker_is_picked_up_by_one(db_url: str):
    @storno.step(kind="retryable")
    def hello(ctx: storno.StepContext) -> str:
        return "hi"

    @storno.saga
    async def s(ctx: storno.SagaContext) -> str:
        return await ctx.step(hello)

    async with storno.Storno(db_url, sagas=[s]) as client:
        handle = await client.start(s)
        assert await handle.status() is storno.RunStatus.PENDING
        async with storno.Storno(db_url, sagas=[s]) as other, other.worker(poll_interval=0.05):
            assert await handle.result(timeout=10) == "hi"


async def test_unknown_run_is_a_clear_error(app: storno.Storno):
    with pytest.raises(storno.RunNotFoundError, match="no run with id 'nope'"):
        await app.get_handle("nope").result()
    with pytest.raises(storno.RunNotFoundError):
        await app.describe("nope")


async def test_worker_concurrency_is_a_ceiling_and_queued_runs_start_without_polling(
    db_url: str,
):
    running: list[int] = []
    peak: list[int] = [0]

    @storno.step(kind="retryable")
    async def nap(ctx: storno.StepContext, i: int) -> int:
        running.append(i)
        peak[0] = max(peak[0], len(running))
        await asyncio.sleep(0.02)
        running.remove(i)
        return i

    @storno.saga
    async def s(ctx: storno.SagaContext, i: int) -> int:
        return await ctx.step(nap, i)

    # A 60 s poll interval: only the worker's own wake-ups can start the queued runs in time.
    async with storno.Storno(db_url, sagas=[s]) as app, app.worker(concurrency=2, poll_interval=60):
        handles = [await app.start(s, i) for i in range(10)]
        assert [await h.result(timeout=10) for h in handles] == list(range(10))
    assert peak[0] == 2
