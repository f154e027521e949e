"""Sagas as data: plans are validated before anything runs, then run on the same engine."""

from __future__ import annotations

import json

import pytest

import storno

undone: list[str] = []
effects: list[str] = []


@storno.step(compensate=lambda ctx, slot: undone.append("book_slot"))
def book_slot(ctx: storno.StepContext, slot: str) -> str:
    effects.append("book_slot")
    return f"booking:{slot}"


@storno.step(compensate=lambda ctx, amount, currency="EUR": undone.append("charge_card"))
def charge_card(ctx: storno.StepContext, amount: int, currency: str = "EUR") -> str:
    effects.append("charge_card")
    return f"charge:{amount}{currency}"


@storno.step(kind="pivot")
def confirm(ctx: storno.StepContext) -> str:
    return "confirmed"


@storno.step(kind="noncompensable")
def send_sms(ctx: storno.StepContext, text: str) -> None:
    effects.append("send_sms")
    if text == "fail":
        raise storno.TerminalError("SMS refused")


@storno.step(kind="retryable")
def sync_calendar(ctx: storno.StepContext) -> str:
    return "synced"


STEPS = [book_slot, charge_card, confirm, send_sms, sync_calendar]


@pytest.fixture(autouse=True)
def _reset() -> None:
    undone.clear()
    effects.clear()


def call(step: str, *args: object, **kwargs: object) -> dict[str, object]:
    return {"step": step, "args": list(args), "kwargs": kwargs}


async def test_a_valid_plan_runs_on_the_engine(db_url: str):
    plan = {
        "steps": [
            call("book_slot", "10:00"),
            call("charge_card", 100, currency="USD"),
            call("confirm"),
            call("send_sms", "see you"),
            call("sync_calendar"),
        ]
    }
    async with storno.Storno(db_url, steps=STEPS) as app, app.worker():
        handle = await app.start_plan(json.dumps(plan), run_id="plan-1")
        assert await handle.result(timeout=10) == [
            "booking:10:00",
            "charge:100USD",
            "confirmed",
            None,
            "synced",
        ]
        info = await handle.describe()
    assert info.saga == "storno.plan"
    assert [s.kind for s in info.steps] == [
        "compensable",
        "compensable",
        "pivot",
        "noncompensable",
        "retryable",
    ]


async def test_a_plan_that_fails_before_the_pivot_compensates_in_reverse(db_url: str):
    plan = [call("book_slot", "10:00"), call("charge_card", 5), call("send_sms", "fail")]
    async with storno.Storno(db_url, steps=STEPS) as app, app.worker():
        handle = await app.start_plan(plan)
        with pytest.raises(storno.RunCompensatedError, match="SMS refused"):
            await handle.result(timeout=10)
    assert undone == ["charge_card", "book_slot"]


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (
            [call("confirm"), call("book_slot", "x")],
            ["#2 'book_slot' is compensable but stands after #1 'confirm' (pivot)"],
        ),
        (
            [call("book_slot", "x"), call("send_sms", "hi"), call("charge_card", 1)],
            ["#3 'charge_card' is compensable but stands after #2 'send_sms' (noncompensable)"],
        ),
        (
            [call("confirm"), call("confirm")],
            ["#2 'confirm' is a second pivot (the first is #1 'confirm')"],
        ),
        (
            [call("sync_calendar"), call("confirm")],
            ["#2 'confirm' is the pivot but stands after #1 'sync_calendar' (retryable)"],
        ),
        (
            [call("book_slot", "x"), call("refund_everything")],
            ["#2 'refund_everything' is not a registered step"],
        ),
        (
            [call("charge_card"), call("book_slot", "x", "y")],
            [
                "#1 'charge_card' does not accept these arguments: missing a required argument: "
                "'amount'",
                "#2 'book_slot' does not accept these arguments: too many positional arguments",
            ],
        ),
    ],
)
async def test_a_bad_plan_is_refused_before_anything_runs(
    db_url: str, plan: list[dict[str, object]], expected: list[str]
):
    async with storno.Storno(db_url, steps=STEPS) as app:
        with pytest.raises(storno.PlanError) as caught:
            await app.start_plan(plan)
        assert await app.list_runs() == []
    # Each problem names the steps first, then the rule they break.
    problems = caught.value.problems
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problem
    assert str(caught.value).startswith("the plan was refused, nothing ran: ")
    assert effects == []


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"calls": []}, 'object with a "steps" list'),
        ({"steps": []}, "has no steps"),
        ([{"name": "book_slot"}], 'a call is an object with a "step" name'),
        ([{"step": "book_slot", "args": "x"}], '"args" must be a list'),
        ([{"step": "book_slot", "argz": []}], "unknown field(s) ['argz']"),
    ],
)
async def test_a_malformed_plan_names_the_problem(db_url: str, plan: object, message: str):
    async with storno.Storno(db_url, steps=STEPS) as app:
        with pytest.raises(storno.PlanError) as caught:
            await app.start_plan(plan)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_validate_plan_is_usable_without_a_store():
    plan = storno.Plan([storno.PlanStep("confirm"), storno.PlanStep("book_slot", ["x"])])
    by_name = {s.name: s for s in STEPS}
    with pytest.raises(storno.PlanError, match="must come before the pivot"):
        storno.validate_plan(plan, by_name.get)
    good = storno.Plan([storno.PlanStep("book_slot", ["x"]), storno.PlanStep("confirm")])
    assert storno.validate_plan(good, by_name.get) == [book_slot, confirm]


async def test_starting_with_options_keeps_the_declared_saga_registered(db_url: str) -> None:
    @storno.saga
    async def hello(ctx: storno.SagaContext) -> str:
        return "hi"

    async with storno.Storno(db_url, sagas=[hello]) as app, app.worker():
        first = await app.start(hello.options(run_id="fixed-id"))
        await first.result(timeout=5)
        again = await app.start(app.find_saga("hello"))
        assert again.run_id != "fixed-id"
        assert app.find_saga("hello") is hello


def test_validate_plan_takes_the_list_an_agent_sends_and_a_mapping_of_steps():
    @storno.step(kind="compensable", compensate=lambda ctx, n: None)
    def hold(ctx: storno.StepContext, n: int) -> int:
        return n

    @storno.step(kind="noncompensable")
    def notify(ctx: storno.StepContext, text: str) -> None:
        pass

    calls = [{"step": "hold", "args": [1]}, {"step": "notify", "kwargs": {"text": "hi"}}]
    assert storno.validate_plan(calls, {"hold": hold, "notify": notify}) == [hold, notify]
    assert storno.validate_plan(calls, [hold, notify]) == [hold, notify]
    with pytest.raises(storno.PlanError, match="'hold' is compensable but stands after"):
        storno.validate_plan(list(reversed(calls)), [hold, notify])
