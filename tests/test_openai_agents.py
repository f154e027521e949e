"""The OpenAI Agents SDK adapter: an SDK agent run inside a saga body, durably.

Offline: every model is the SDK's own ``agents.testing.ScriptedModel`` (no network, no API
key), tracing is off. Each test drives a real ``Runner.run`` through
``storno.agents.openai_agents.run`` on a SQLite file and checks what the engine recorded and
what the scripted model was asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

sdk = pytest.importorskip(
    "agents", reason="the OpenAI Agents SDK is not installed (pip install -e '.[openai-agents]')"
)

from agents import Agent, FunctionTool, set_tracing_disabled  # noqa: E402
from agents.testing import (  # noqa: E402
    ModelCall,
    ModelStep,
    ScriptedModel,
    assistant_message,
    function_call,
)

import storno  # noqa: E402
from conftest import wait_for  # noqa: E402
from storno import agents  # noqa: E402
from storno._model import forward_key  # noqa: E402
from storno.agents import openai_agents as oa  # noqa: E402
from storno.testing import FaultInjector, VirtualClock, restart_worker  # noqa: E402

set_tracing_disabled(True)

LEDGER: list[str] = []
KEYS: list[tuple[str, int, str]] = []  # (tool, attempt, idempotency key)
AGENT: dict[str, Agent[Any]] = {}  # the agent the next run uses (each test sets its own)


@pytest.fixture(autouse=True)
def _clear() -> None:
    LEDGER.clear()
    KEYS.clear()
    AGENT.clear()


tools = agents.ToolRegistry()


@tools.read
def find_slots(ctx: agents.ToolContext, day: str) -> list[str]:
    """Free slots on a day."""
    LEDGER.append(f"find {day}")
    return ["09:00", "11:00"]


@tools.write(kind="compensable")
def book_slot(ctx: storno.StepContext, slot: str) -> str:
    """Book a slot."""
    KEYS.append(("book_slot", ctx.attempt, ctx.idempotency_key))
    LEDGER.append(f"book {slot}")
    return f"booking {slot}"


@book_slot.compensation
def cancel_slot(ctx: storno.CompensationContext[str], slot: str) -> None:
    LEDGER.append(f"cancel {slot}")


@tools.write(
    kind="compensable",
    retry=storno.RetryPolicy(initial_interval=1, jitter=0),
    approval=lambda args: args["amount"] > 500,
)
def charge_card(ctx: storno.StepContext, customer: str, amount: int) -> str:
    """Charge the customer's card."""
    KEYS.append(("charge_card", ctx.attempt, ctx.idempotency_key))
    LEDGER.append(f"charge {customer} {amount}")
    return f"ch-{amount}"


@charge_card.compensation
def refund(ctx: storno.CompensationContext[str], customer: str, amount: int) -> None:
    LEDGER.append(f"refund {customer} {amount}")


@tools.write(kind="compensable")
def add_to_calendar(ctx: storno.StepContext, slot: str) -> str:
    """Put the booking in the calendar."""
    raise storno.TerminalError("calendar API: 403 forbidden")


@add_to_calendar.compensation
def remove_from_calendar(ctx: storno.CompensationContext[str], slot: str) -> None:
    LEDGER.append(f"uncalendar {slot}")


@tools.write(kind="noncompensable")
def send_sms(ctx: storno.StepContext, text: str) -> str:
    """Text the customer."""
    LEDGER.append(f"sms {text}")
    return "sent"


@storno.saga
async def assistant(ctx: storno.SagaContext, request: str) -> str:
    result = await oa.run(ctx, AGENT["agent"], request)
    return str(result.final_output)


SDK_TOOLS = oa.function_tools(tools)


def agent_with(model: ScriptedModel, *, tools_: list[Any] | None = None) -> Agent[Any]:
    agent: Agent[Any] = Agent(
        name="booker",
        instructions="Book what the customer asks for.",
        tools=SDK_TOOLS if tools_ is None else tools_,
        model=model,
    )
    AGENT["agent"] = agent
    return agent


def app_at(tmp_path: Path, **kwargs: Any) -> storno.Storno:
    return storno.Storno(
        f"sqlite:///{tmp_path / 'agents.db'}", sagas=[assistant], steps=tools.steps(), **kwargs
    )


def outputs(call: ModelCall) -> dict[str, str]:
    """The tool outputs the model is shown in this call, by call id."""
    return {
        item["call_id"]: item["output"]
        for item in call.input
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    }


def done(text: str = "done") -> list[Any]:
    return [assistant_message(text)]


async def test_a_response_survives_the_journal_as_json():
    usage = sdk.Usage(requests=1, input_tokens=12, output_tokens=3, total_tokens=15)
    response = sdk.ModelResponse(
        output=[
            assistant_message("let me look"),
            function_call("find_slots", {"day": "mon"}, call_id="c1"),
        ],
        usage=usage,
        response_id="resp-1",
    )
    data = oa.dump_response(response)
    again = oa.load_response(json.loads(json.dumps(data)))
    assert again.output == response.output
    assert again.usage.total_tokens == 15 and again.response_id == "resp-1"


async def test_a_write_tools_key_is_structural_and_not_in_the_models_view(tmp_path: Path):
    model = ScriptedModel(
        [
            [function_call("charge_card", {"customer": "ada", "amount": 120}, call_id="c1")],
            done(),
            [function_call("charge_card", {"customer": "ada", "amount": 120}, call_id="c1")],
            done(),
        ]
    )
    agent_with(model)
    async with app_at(tmp_path, clock=VirtualClock()) as app:
        with FaultInjector() as faults:
            faults.fail(charge_card, times=1)  # a transient failure: retried under the key
            faults.crash(charge_card, when="after_call")  # lands, the worker dies unrecorded
            worker = app.worker(worker_id="w1")
            await worker.start()
            first = await app.start(assistant, "charge ada 120")
            await faults.wait_for_crash()
            worker = await restart_worker(worker)
            assert await first.result(timeout=10) == "done"
            faults.clear()
            second = await app.start(assistant, "charge ada 120 again")
            assert await second.result(timeout=10) == "done"
        info = await first.describe()

    # The model saw the tool's own parameters only: no context, no key.
    schema = next(t for t in model.first_call.tools if t.name == "charge_card")
    assert isinstance(schema, FunctionTool)
    assert set(schema.params_json_schema["properties"]) == {"customer", "amount"}
    assert "key" not in json.dumps(schema.params_json_schema).lower()

    charges = [key for tool, _, key in KEYS if tool == "charge_card"]
    # Attempt 1 failed before its call; attempt 2 landed and crashed; the restart's attempt 3
    # and the second run (same call id, same arguments) are the other two.
    assert [a for tool, a, _ in KEYS if tool == "charge_card"] == [2, 3, 1]
    position = info.steps[0].position
    assert charges[0] == charges[1] == forward_key(first.run_id, position, "charge_card")
    assert info.steps[0].idempotency_key == charges[0]
    assert charges[2] == forward_key(second.run_id, position, "charge_card") != charges[0]


async def test_a_resumed_run_does_not_ask_the_model_again(tmp_path: Path):
    # Asked a second time for its first answer, this model would book 11:00, not 09:00.
    first_answers: list[str] = []

    def answer(call: ModelCall) -> list[Any]:
        if outputs(call):
            return done()
        first_answers.append("09:00" if not first_answers else "11:00")
        return [function_call("book_slot", {"slot": first_answers[-1]}, call_id="c1")]

    model = ScriptedModel([ModelStep.respond(answer) for _ in range(4)])
    agent_with(model)
    async with app_at(tmp_path) as app:
        with FaultInjector() as faults:
            # The model's answer is recorded; the worker dies before the tool call is made.
            faults.crash(book_slot, when="before_call")
            worker = app.worker(worker_id="w1")
            await worker.start()
            handle = await app.start(assistant, "book monday")
            crash = await faults.wait_for_crash()
            assert crash.run_id == handle.run_id
            assert len(model.calls) == 1 and LEDGER == []
            await restart_worker(worker)
            assert await handle.result(timeout=10) == "done"
        info = await handle.describe()
    assert LEDGER == ["book 09:00"]
    assert first_answers == ["09:00"]  # the first answer came from the journal
    assert len(model.calls) == 2
    assert [s.name for s in info.steps] == ["book_slot"]
    recorded = [e for e in info.history if e.type == "value_recorded"]
    assert [e.data["name"] for e in recorded] == ["model", "model"]
    # The decision is journaled readably, and what the model was told with it.
    assert recorded[0].value["decision"] == {
        "text": None,
        "tool_calls": [{"id": "c1", "name": "book_slot", "arguments": {"slot": "09:00"}}],
    }
    assert recorded[1].value["request"]["new"][-1]["output"] == "booking 09:00"


async def test_a_failing_write_compensates_the_writes_done_in_reverse(tmp_path: Path):
    model = ScriptedModel(
        [
            [function_call("find_slots", {"day": "mon"}, call_id="c1")],
            [function_call("book_slot", {"slot": "09:00"}, call_id="c2")],
            [function_call("charge_card", {"customer": "ada", "amount": 90}, call_id="c3")],
            [function_call("add_to_calendar", {"slot": "09:00"}, call_id="c4")],
            done("should not be reached"),
        ]
    )
    agent_with(model)
    async with app_at(tmp_path) as app, app.worker():
        handle = await app.start(assistant, "book and pay")
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=10)
        info = await handle.describe()
    assert LEDGER == ["find mon", "book 09:00", "charge ada 90", "refund ada 90", "cancel 09:00"]
    assert len(model.calls) == 4
    # The run failed with storno's own error, not the SDK's wrapping of it.
    assert info.error is not None and "calendar API: 403" in json.dumps(info.error)
    assert "Error running tool" not in json.dumps(info.error)


async def test_parallel_calls_run_where_the_order_rule_allows(tmp_path: Path):
    # The model asks for three writes at once; the calendar fails, so the SMS (which cannot be
    # undone) is never sent and the booking is compensated.
    model = ScriptedModel(
        [
            [
                function_call("book_slot", {"slot": "09:00"}, call_id="c1"),
                function_call("send_sms", {"text": "see you at 9"}, call_id="c2"),
                function_call("add_to_calendar", {"slot": "09:00"}, call_id="c3"),
            ],
            done("should not be reached"),
        ]
    )
    agent_with(model)
    async with app_at(tmp_path) as app, app.worker():
        handle = await app.start(assistant, "book, tell me, calendar")
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=10)
        info = await handle.describe()
    assert LEDGER == ["book 09:00", "cancel 09:00"]
    assert "send_sms" not in [s.name for s in info.steps]


async def test_a_write_that_cannot_be_undone_waits_for_the_turns_compensable_ones(tmp_path: Path):
    # Asked for in one response, SMS first: the SDK would start both at once, and the
    # booking would then come after a write that cannot be undone. storno runs the booking
    # first and sends the SMS once it succeeded.
    model = ScriptedModel(
        [
            [
                function_call("send_sms", {"text": "booked"}, call_id="c1"),
                function_call("book_slot", {"slot": "09:00"}, call_id="c2"),
            ],
            done(),
        ]
    )
    agent_with(model)
    async with app_at(tmp_path) as app, app.worker():
        handle = await app.start(assistant, "text and book")
        assert await handle.result(timeout=10) == "done"
        info = await handle.describe()
    assert LEDGER == ["book 09:00", "sms booked"]
    assert [s.name for s in info.steps] == ["book_slot", "send_sms"]
    assert outputs(model.last_call) == {"c1": "sent", "c2": "booking 09:00"}


async def test_the_order_rule_refuses_a_write_and_the_model_is_told_why(tmp_path: Path):
    def after_refusal(call: ModelCall) -> list[Any]:
        return done(f"told: {outputs(call)['c2']}")

    model = ScriptedModel(
        [
            [function_call("send_sms", {"text": "booked"}, call_id="c1")],
            [function_call("book_slot", {"slot": "09:00"}, call_id="c2")],
            ModelStep.respond(after_refusal),
        ]
    )
    agent_with(model)
    async with app_at(tmp_path) as app, app.worker():
        handle = await app.start(assistant, "text, then book")
        answer = await handle.result(timeout=10)
    assert LEDGER == ["sms booked"]  # the booking never ran
    assert answer.startswith("told: error: refused, nothing ran")
    assert "'send_sms'" in answer and "compensable* pivot?" in answer


async def test_an_approval_is_bound_to_the_arguments_it_was_given_for(tmp_path: Path):
    model = ScriptedModel(
        [
            [function_call("charge_card", {"customer": "ada", "amount": 900}, call_id="c1")],
            [function_call("charge_card", {"customer": "ada", "amount": 950}, call_id="c2")],
            done(),
        ]
    )
    agent_with(model)
    async with app_at(tmp_path) as app, app.worker():
        handle = await app.start(assistant, "charge ada")

        async def waiting_on(amount: int) -> Any:
            info = await handle.describe()
            if info.status is not storno.RunStatus.WAITING:
                return None
            started = [e for e in info.history if e.type == "signal_wait_started"]
            subject = started[-1].data.get("subject") if started else None
            return started[-1] if subject and subject["arguments"]["amount"] == amount else None

        first = await wait_for(lambda: waiting_on(900))
        assert first.data["subject"] == {
            "tool": "charge_card",
            "arguments": {"customer": "ada", "amount": 900},
        }
        assert LEDGER == []  # nothing charged while it waits
        await app.approve(handle.run_id, by="ops", digest=first.data["digest"])

        # The model now asks for another amount: the old approval does not cover it.
        second = await wait_for(lambda: waiting_on(950))
        assert second.data["digest"] != first.data["digest"]
        assert LEDGER == ["charge ada 900"]
        with pytest.raises(storno.RunStateError):
            await app.approve(handle.run_id, by="ops", digest=first.data["digest"])
        await app.approve(handle.run_id, by="ops")
        assert await handle.result(timeout=10) == "done"
    assert LEDGER == ["charge ada 900", "charge ada 950"]
    # Each wait replayed the run from the top; the model was asked once per answer.
    assert len(model.calls) == 3


async def test_a_rejected_approval_compensates(tmp_path: Path):
    model = ScriptedModel(
        [
            [function_call("book_slot", {"slot": "09:00"}, call_id="c1")],
            [function_call("charge_card", {"customer": "ada", "amount": 700}, call_id="c2")],
            done("should not be reached"),
        ]
    )
    agent_with(model)
    async with app_at(tmp_path) as app, app.worker():
        handle = await app.start(assistant, "book and charge")

        async def waiting() -> bool:
            return (await handle.status()) is storno.RunStatus.WAITING

        await wait_for(waiting)
        await app.reject(handle.run_id, by="ops", reason="too much")
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=10)
    assert LEDGER == ["book 09:00", "cancel 09:00"]


async def test_the_sdks_own_approval_flow_is_refused(tmp_path: Path):
    async def wire(ctx: Any, arguments: str) -> str:
        LEDGER.append("wired")
        return "ok"

    asks_the_sdk = FunctionTool(
        name="wire_money",
        description="Wire money.",
        params_json_schema={"type": "object", "properties": {}},
        on_invoke_tool=wire,
        strict_json_schema=False,
        needs_approval=True,
    )
    model = ScriptedModel([[function_call("wire_money", {}, call_id="c1")], done()])
    agent_with(model, tools_=[*SDK_TOOLS, asks_the_sdk])
    async with app_at(tmp_path) as app, app.worker():
        handle = await app.start(assistant, "wire it")
        with pytest.raises(storno.RunFailedError):
            await handle.result(timeout=10)
        info = await handle.describe()
    assert "needs_approval" in json.dumps(info.error)
    assert LEDGER == [] and len(model.calls) == 0


async def test_the_tools_work_only_inside_a_durable_run():
    agent = agent_with(
        ScriptedModel([[function_call("book_slot", {"slot": "09:00"}, call_id="c1")], done()])
    )
    with pytest.raises(sdk.UserError, match="only inside"):
        await sdk.Runner.run(agent, "book", run_config=sdk.RunConfig(tracing_disabled=True))
    assert LEDGER == []


async def test_a_handoff_journals_the_next_agents_model_too(tmp_path: Path):
    first_answers: list[int] = []

    def payer_answer(call: ModelCall) -> list[Any]:
        if outputs(call).get("c2"):
            return done("paid")
        first_answers.append(1)
        amount = 80 if len(first_answers) == 1 else 81  # would differ if asked again
        return [function_call("charge_card", {"customer": "ada", "amount": amount}, call_id="c2")]

    payer_model = ScriptedModel([ModelStep.respond(payer_answer) for _ in range(4)])
    payer: Agent[Any] = Agent(
        name="payer", tools=SDK_TOOLS, model=oa.DurableModel(payer_model, name="payer")
    )
    front = ScriptedModel([[function_call("transfer_to_payer", {}, call_id="c1")]])
    AGENT["agent"] = Agent(name="front", handoffs=[payer], model=front)
    async with app_at(tmp_path) as app:
        with FaultInjector() as faults:
            faults.crash(charge_card, when="before_call")
            worker = app.worker(worker_id="w1")
            await worker.start()
            handle = await app.start(assistant, "pay")
            await faults.wait_for_crash()
            await restart_worker(worker)
            assert await handle.result(timeout=10) == "paid"
        info = await handle.describe()
    assert LEDGER == ["charge ada 80"] and first_answers == [1]
    names = [e.data["name"] for e in info.history if e.type == "value_recorded"]
    assert names == ["model", "payer", "payer"]


async def test_an_agent_whose_model_would_not_be_journaled_is_refused(tmp_path: Path):
    payer: Agent[Any] = Agent(name="payer", tools=SDK_TOOLS, model=ScriptedModel([done()]))
    front = ScriptedModel([[function_call("transfer_to_payer", {}, call_id="c1")]])
    AGENT["agent"] = Agent(name="front", handoffs=[payer], model=front)
    async with app_at(tmp_path) as app, app.worker():
        handle = await app.start(assistant, "pay")
        with pytest.raises(storno.RunFailedError):
            await handle.result(timeout=10)
        info = await handle.describe()
    assert "DurableModel" in json.dumps(info.error) and len(front.calls) == 0
