"""The Pydantic AI adapter: an agent's model requests and registry tool calls run through storno.

Every test drives a real ``pydantic_ai.Agent`` with Pydantic AI's own ``FunctionModel`` (no
network, no instrumentation), inside a saga on a real SQLite file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pydantic_ai", reason="the pydantic-ai extra is not installed")

from pydantic_ai import Agent, DeferredToolRequests, DeferredToolResults, ToolApproved
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    RetryPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

import agent_shop
import storno
from storno._model import forward_key
from storno.agents import pydantic_ai as storno_pai
from storno.testing import FaultInjector, restart_worker

Turn = Callable[[list[ModelMessage]], ModelResponse]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'storno.db'}"


def calls(*parts: tuple[str, dict[str, Any]], turn: int = 1) -> ModelResponse:
    """A response asking for tool calls; call ids say which turn asked."""
    return ModelResponse(
        parts=[
            ToolCallPart(name, args, tool_call_id=f"t{turn}-{i}")
            for i, (name, args) in enumerate(parts, 1)
        ]
    )


def text(words: str) -> ModelResponse:
    return ModelResponse(parts=[TextPart(words)])


class Script:
    """A scripted model: answer ``n`` is ``turns[n]`` (a response or a function of the
    messages). ``asked`` counts every request; a request past the script is a test failure."""

    def __init__(self, *turns: ModelResponse | Turn) -> None:
        self.turns = list(turns)
        self.asked = 0
        self.seen: list[list[ModelMessage]] = []
        self.infos: list[AgentInfo] = []
        self.__name__ = "script"  # FunctionModel names itself after its function

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.seen.append(list(messages))
        self.infos.append(info)
        index = self.asked
        self.asked += 1
        if index >= len(self.turns):
            return text(f"asked again ({index + 1})")
        turn = self.turns[index]
        return turn if isinstance(turn, ModelResponse) else turn(messages)


def returns(messages: list[ModelMessage]) -> list[ToolReturnPart | RetryPromptPart]:
    """The tool results in the last request the model was sent."""
    last = messages[-1]
    assert isinstance(last, ModelRequest)
    return [p for p in last.parts if isinstance(p, ToolReturnPart | RetryPromptPart)]


class Shop(agent_shop.Shop):
    """The shared booking tools, run by a Pydantic AI agent."""

    def saga(self, script: Script, **run_kwargs: Any) -> storno.Saga[..., Any]:
        agent = Agent(FunctionModel(script), toolsets=[storno_pai.StornoToolset(self.tools)])

        @storno.saga(name="booking_agent")
        async def booking_agent(ctx: storno.SagaContext, prompt: str) -> str:
            result = await storno_pai.run(ctx, agent, prompt, **run_kwargs)
            return str(result.output)

        return booking_agent

    def app(self, url: str, saga: storno.Saga[..., Any]) -> storno.Storno:
        return storno.Storno(url, sagas=[saga], steps=self.tools.steps())

    def effects(self) -> list[tuple[str, Any]]:
        return [entry for entry in self.log if entry[0] != "find_slots"]


async def waiting_for_approval(app: storno.Storno, run_id: str, count: int = 1) -> bool:
    info = await app.describe(run_id)
    waits = [e for e in info.history if e.type == "signal_wait_started" and e.data.get("approval")]
    return info.status is storno.RunStatus.WAITING and len(waits) >= count


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


# --- the key and the schema the model sees ---------------------------------------------------


async def test_a_write_tool_key_is_structural_the_same_on_a_retry_and_after_a_restart(
    sqlite_url: str,
) -> None:
    shop = Shop()
    script = Script(
        calls(("find_slots", {"day": "mon"}), ("book_slot", {"slot": "09:00"})),
        calls(("charge_card", {"customer": "ada", "amount": 120}), turn=2),
        text("booked and charged"),
    )
    saga = shop.saga(script)
    shop.flaky.add("book_slot")  # a transient failure after the call: retried under its key
    async with shop.app(sqlite_url, saga) as app:
        with FaultInjector() as faults:
            faults.crash("charge_card", when="after_call")  # landed, not recorded: a restart
            worker = app.worker(worker_id="w1")
            await worker.start()
            handle = await app.start(saga, "book me in on monday")
            await faults.wait_for_crash()
            worker = await restart_worker(worker)
            assert await handle.result(timeout=10) == "booked and charged"
            await worker.stop()
        info = await handle.describe()

    steps = {s.name: s for s in info.steps}
    for name in ("book_slot", "charge_card"):
        expected = forward_key(handle.run_id, steps[name].position, name)
        assert steps[name].idempotency_key == expected
        # Every call the provider saw carried that one key: the retry and the repeat alike.
        assert [key for tool, key in shop.keys if tool == name] == [expected, expected]
    assert steps["book_slot"].attempts == 2
    # The model saw the registry's schemas, with neither the context nor the key in them.
    tools = {t.name: t for t in script.infos[0].function_tools}
    assert set(tools) == {"find_slots", "book_slot", "charge_card", "send_sms", "add_to_calendar"}
    assert tools["charge_card"].description == "Charge the customer's card."
    charge = tools["charge_card"].parameters_json_schema
    assert set(charge["properties"]) == {"customer", "amount"}
    assert "ctx" not in str(charge) and "idempotency" not in str(charge)
    assert script.asked == 3  # the restart replayed the two recorded answers


# --- replay: the model is not asked again -----------------------------------------------------


async def test_a_crash_between_the_model_answer_and_the_tool_call_replays_the_answer(
    sqlite_url: str,
) -> None:
    shop = Shop()
    # Asked again for its first turn, this model would charge 999 instead of 120.
    first: list[int] = []

    def first_turn(messages: list[ModelMessage]) -> ModelResponse:
        first.append(1)
        amount = 120 if len(first) == 1 else 999
        return calls(("charge_card", {"customer": "ada", "amount": amount}))

    script = Script(first_turn, text("charged"))
    saga = shop.saga(script)
    async with shop.app(sqlite_url, saga) as app:
        with FaultInjector() as faults:
            faults.crash("charge_card", when="before_call")  # after the answer was journaled
            worker = app.worker(worker_id="w1")
            await worker.start()
            handle = await app.start(saga, "charge ada")
            await faults.wait_for_crash()
            assert shop.log == [] and script.asked == 1
            worker = await restart_worker(worker)
            assert await handle.result(timeout=10) == "charged"
            await worker.stop()
        info = await handle.describe()
    assert first == [1]  # the first turn was asked once, before the crash
    assert shop.log == [("charge_card", 120)]
    assert script.asked == 2
    recorded = [e for e in info.history if e.type == "value_recorded" and e.data["name"] == "model"]
    assert len(recorded) == 2  # each model answer journaled once
    # The journal holds what the model was sent and what it answered.
    assert recorded[0].value["request"][0]["parts"][-1]["content"] == "charge ada"
    assert recorded[0].value["response"]["parts"][0]["args"] == {"customer": "ada", "amount": 120}
    assert recorded[0].value["answered"] == {
        "text": None,
        "tool_calls": [
            {"id": "t1-1", "name": "charge_card", "arguments": {"customer": "ada", "amount": 120}}
        ],
    }
    assert recorded[1].value["answered"] == {"text": "charged", "tool_calls": []}


@pytest.mark.slow
def test_a_sigkill_between_the_model_answer_and_the_tool_call_replays_the_answer(
    tmp_path: Path,
) -> None:
    """A real worker process dies by SIGKILL after the model's answer was journaled and
    before the tool it asked for ran; a new process resumes the run from the journal."""
    app_file = Path(__file__).with_name("pydantic_ai_app.py")
    db, log = tmp_path / "agent.db", tmp_path / "agent.log"
    env = {**os.environ, "PYDANTIC_AI_APP_LOG": str(log)}

    def worker(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(app_file), "--db", str(db), *flags],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    killed = worker("--start", "--kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert log.read_text().splitlines() == ["asked 0", "killed"]
    resumed = worker()
    assert resumed.returncode == 0, resumed.stderr
    done = log.read_text().splitlines()
    # The first turn was not asked again (it would have charged 999); the charge ran once.
    assert done[:2] == ["asked 0", "killed"]
    assert [line.split()[:2] for line in done[2:]] == [["charge", "120"], ["asked", "1"]]

    async def outcome() -> storno.RunInfo:
        async with storno.Storno(f"sqlite:///{db}") as app:
            return await app.describe("agent-1")

    info = asyncio.run(outcome())
    assert info.status is storno.RunStatus.COMPLETED
    (charge,) = info.steps
    assert done[2].split()[2] == charge.idempotency_key == forward_key("agent-1", 1, "charge_card")


# --- compensation --------------------------------------------------------------------------


async def test_a_write_that_fails_for_good_compensates_the_writes_done_in_reverse(
    sqlite_url: str,
) -> None:
    shop = Shop()
    script = Script(
        calls(("book_slot", {"slot": "09:00"})),
        calls(("charge_card", {"customer": "ada", "amount": 120}), turn=2),
        calls(("add_to_calendar", {"slot": "09:00"}), turn=3),
        text("never reached"),
    )
    saga = shop.saga(script)
    async with shop.app(sqlite_url, saga) as app, app.worker():
        with FaultInjector() as faults:
            faults.fail_terminally("add_to_calendar")
            handle = await app.start(saga, "book and charge")
            with pytest.raises(storno.RunCompensatedError):
                await handle.result(timeout=10)
    assert shop.effects() == [
        ("book_slot", "09:00"),
        ("charge_card", 120),
        ("refund", "charge-ada-120"),
        ("cancel_slot", "booking-09:00"),
    ]
    assert script.asked == 3  # the failure ended the agent: no turn after it


async def test_parallel_calls_run_as_the_order_rule_allows_the_sms_waits_for_the_charge(
    sqlite_url: str,
) -> None:
    """One turn asks for book, SMS and charge at once, and the charge fails: the SMS (which
    cannot be undone) never goes out, and the booking is compensated."""
    shop = Shop()
    script = Script(
        calls(
            ("book_slot", {"slot": "09:00"}),
            ("send_sms", {"to": "ada", "body": "see you at 9"}),
            ("charge_card", {"customer": "ada", "amount": 120}),
        ),
        text("never reached"),
    )
    saga = shop.saga(script)
    shop.declined = True
    async with shop.app(sqlite_url, saga) as app, app.worker():
        handle = await app.start(saga, "book, text and charge")
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=10)
    assert ("send_sms", "see you at 9") not in shop.log
    assert shop.effects() == [("book_slot", "09:00"), ("cancel_slot", "booking-09:00")]


# --- the order rule ------------------------------------------------------------------------


async def test_a_write_the_order_rule_forbids_is_refused_and_the_model_sees_why(
    sqlite_url: str,
) -> None:
    shop = Shop()
    told: list[ToolReturnPart | RetryPromptPart] = []

    def after_refusal(messages: list[ModelMessage]) -> ModelResponse:
        told.extend(returns(messages))
        return text("could not book after the text")

    script = Script(
        calls(("send_sms", {"to": "ada", "body": "booked"})),
        calls(("book_slot", {"slot": "09:00"}), ("nope", {}), turn=2),
        after_refusal,
    )
    saga = shop.saga(script)
    async with shop.app(sqlite_url, saga) as app, app.worker():
        handle = await app.start(saga, "text, then book")
        assert await handle.result(timeout=10) == "could not book after the text"
    assert shop.effects() == [("send_sms", "booked")]  # the booking never ran
    refusal, unknown = told
    assert isinstance(refusal, ToolReturnPart)
    assert refusal.tool_name == "book_slot" and refusal.outcome == "failed"
    assert "refused, nothing ran" in refusal.content and "'send_sms'" in refusal.content
    assert "compensable* pivot?" in refusal.content  # what order would be allowed
    # A tool the registry does not have: Pydantic AI answers it, nothing of storno runs.
    assert unknown.tool_name == "nope"


async def test_bad_arguments_are_refused_by_the_registry_schema(sqlite_url: str) -> None:
    shop = Shop()
    told: list[ToolReturnPart | RetryPromptPart] = []

    def after(messages: list[ModelMessage]) -> ModelResponse:
        told.extend(returns(messages))
        return text("fixed nothing")

    script = Script(calls(("charge_card", {"customer": "ada", "amount": "lots"})), after)
    saga = shop.saga(script)
    async with shop.app(sqlite_url, saga) as app, app.worker():
        handle = await app.start(saga, "charge")
        assert await handle.result(timeout=10) == "fixed nothing"
    assert shop.log == []
    (answer,) = told
    assert isinstance(answer, ToolReturnPart)
    assert answer.outcome == "failed" and "bad arguments for 'charge_card'" in answer.content


# --- approvals -----------------------------------------------------------------------------


async def test_an_approval_is_bound_to_its_arguments_a_changed_amount_needs_a_new_one(
    sqlite_url: str,
) -> None:
    shop = Shop()
    script = Script(
        calls(("charge_card", {"customer": "ada", "amount": 800})),
        calls(("charge_card", {"customer": "ada", "amount": 900}), turn=2),
        text("charged twice"),
    )
    saga = shop.saga(script)
    async with shop.app(sqlite_url, saga) as app, app.worker():
        handle = await app.start(saga, "charge ada")
        await wait_until(lambda: waiting_for_approval(app, handle.run_id))
        assert shop.log == []  # waits, durably, before the charge
        info = await handle.describe()
        assert await app.approve(handle.run_id, by="ops")
        # The approval covered 800; the model's next call asks for 900: a new approval.
        await wait_until(lambda: waiting_for_approval(app, handle.run_id, count=2))
        assert shop.log == [("charge_card", 800)]
        assert await app.approve(handle.run_id, by="ops-lead")
        assert await handle.result(timeout=10) == "charged twice"
        info = await handle.describe()
    assert shop.log == [("charge_card", 800), ("charge_card", 900)]
    waits = [e for e in info.history if e.type == "signal_wait_started" and e.data.get("approval")]
    # Each wait showed the operator the tool and its arguments, under a digest of its own.
    assert [w.data["subject"] for w in waits] == [
        {"tool": "charge_card", "arguments": {"customer": "ada", "amount": 800}},
        {"tool": "charge_card", "arguments": {"customer": "ada", "amount": 900}},
    ]
    assert waits[0].data["digest"] != waits[1].data["digest"]


async def test_a_pydantic_ai_approval_does_not_stand_in_for_storno_s(sqlite_url: str) -> None:
    """The toolset behind Pydantic AI's ``approval_required`` for the charge: the agent runs
    the booking and defers the charge, the code approves it the Pydantic AI way (with changed
    arguments), and the charge still waits for an operator's storno approval of the arguments
    it runs with. Nothing runs twice."""
    shop = Shop()
    script = Script(
        calls(
            ("book_slot", {"slot": "09:00"}), ("charge_card", {"customer": "ada", "amount": 800})
        ),
        text("booked and charged"),
    )
    gated = storno_pai.StornoToolset(shop.tools).approval_required(
        lambda ctx, tool_def, args: tool_def.name == "charge_card"
    )
    agent = Agent(FunctionModel(script), toolsets=[gated], output_type=[str, DeferredToolRequests])

    @storno.saga(name="gated_agent")
    async def gated_agent(ctx: storno.SagaContext, prompt: str) -> str:
        first = await storno_pai.run(ctx, agent, prompt)
        deferred = first.output
        assert isinstance(deferred, DeferredToolRequests)
        (call,) = deferred.approvals
        approved = ToolApproved(override_args={"customer": "ada", "amount": 700})
        second = await storno_pai.run(
            ctx,
            agent,
            message_history=first.all_messages(),
            deferred_tool_results=DeferredToolResults(approvals={call.tool_call_id: approved}),
        )
        return str(second.output)

    async with shop.app(sqlite_url, gated_agent) as app, app.worker():
        handle = await app.start(gated_agent, "book and charge ada")
        await wait_until(lambda: waiting_for_approval(app, handle.run_id))
        assert shop.log == [("book_slot", "09:00")]  # Pydantic AI's approval ran no charge
        info = await handle.describe()
        assert await app.approve(handle.run_id, by="ops")
        assert await handle.result(timeout=10) == "booked and charged"
    # Each write once; the charge with the arguments the operator approved.
    assert shop.log == [("book_slot", "09:00"), ("charge_card", 700)]
    waits = [e for e in info.history if e.type == "signal_wait_started" and e.data.get("approval")]
    assert [w.data["subject"]["arguments"] for w in waits] == [{"customer": "ada", "amount": 700}]


async def test_a_streamed_request_is_journaled_and_answered_in_one_piece(sqlite_url: str) -> None:
    """With an event stream handler, Pydantic AI asks the model to stream: the answer is
    still decided once and the handler sees it, and the tool call it asked for."""
    shop = Shop()
    script = Script(calls(("find_slots", {"day": "mon"})), text("09:00 is free"))
    seen: list[str] = []

    async def handler(ctx: Any, events: Any) -> None:
        async for event in events:
            seen.append(type(event).__name__)

    saga = shop.saga(script, event_stream_handler=handler)
    async with shop.app(sqlite_url, saga) as app, app.worker():
        handle = await app.start(saga, "what is free?")
        assert await handle.result(timeout=10) == "09:00 is free"
        info = await handle.describe()
    recorded = [e for e in info.history if e.type == "value_recorded" and e.data["name"] == "model"]
    assert len(recorded) == 2 and script.asked == 2
    assert "FunctionToolCallEvent" in seen and "FunctionToolResultEvent" in seen
    assert "PartStartEvent" in seen  # the journaled answer replayed as stream events


# --- outside a saga --------------------------------------------------------------------------


async def test_the_toolset_outside_a_saga_says_where_it_belongs() -> None:
    shop = Shop()
    script = Script(calls(("find_slots", {"day": "mon"})), text("no"))
    agent = Agent(FunctionModel(script), toolsets=[storno_pai.StornoToolset(shop.tools)])
    with pytest.raises(storno.ConfigurationError, match="inside a saga body"):
        await agent.run("hello")
