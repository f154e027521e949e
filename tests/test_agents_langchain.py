"""The LangChain adapter: a ``create_agent`` agent's model calls and registry tool calls run
through storno.

Every test drives a real LangChain v1 agent (a LangGraph graph) with a scripted chat model
built on LangChain's ``GenericFakeChatModel`` (no network), inside a saga on a real SQLite file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain.agents", reason="the langchain extra is not installed")

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from pydantic import Field

import agent_shop
import storno
from storno._model import forward_key
from storno.agents import langchain as storno_lc
from storno.testing import FaultInjector, restart_worker

Turn = Callable[[list[BaseMessage]], AIMessage]


class ScriptedChat(GenericFakeChatModel):
    """LangChain's fake chat model, able to take tools (``bind_tools`` returns the model) and
    keeping what it was asked: ``seen`` holds every request."""

    seen: list[list[BaseMessage]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        self.seen.append(list(messages))
        return super()._generate(messages, *args, **kwargs)


def script(*turns: AIMessage | Turn) -> ScriptedChat:
    model = ScriptedChat(messages=iter(()))

    def answers() -> Iterator[AIMessage]:
        for index, turn in enumerate(turns):
            yield turn if isinstance(turn, AIMessage) else turn(model.seen[index])
        while True:
            yield AIMessage(content="asked again")

    model.messages = answers()
    return model


def calls(*parts: tuple[str, dict[str, Any]], turn: int = 1) -> AIMessage:
    return AIMessage(
        content="",
        tool_calls=[
            {"name": name, "args": args, "id": f"t{turn}-{i}", "type": "tool_call"}
            for i, (name, args) in enumerate(parts, 1)
        ],
    )


def text(words: str) -> AIMessage:
    return AIMessage(content=words)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'storno.db'}"


class Shop(agent_shop.Shop):
    """The shared booking tools, run by a LangChain agent."""

    def saga(self, model: ScriptedChat) -> storno.Saga[..., Any]:
        agent = create_agent(model, middleware=[storno_lc.StornoMiddleware(self.tools)])

        @storno.saga(name="booking_agent")
        async def booking_agent(ctx: storno.SagaContext, prompt: str) -> str:
            result = await storno_lc.run(ctx, agent, {"messages": [("user", prompt)]})
            return str(result["messages"][-1].content)

        return booking_agent

    def app(self, url: str, saga: storno.Saga[..., Any]) -> storno.Storno:
        return storno.Storno(url, sagas=[saga], steps=self.tools.steps())

    def effects(self) -> list[tuple[str, Any]]:
        return [entry for entry in self.log if entry[0] != "find_slots"]


def tool_results(messages: list[BaseMessage]) -> list[ToolMessage]:
    return [m for m in messages if isinstance(m, ToolMessage)]


async def test_a_crash_between_the_model_answer_and_the_tool_call_replays_the_answer(
    sqlite_url: str,
) -> None:
    shop = Shop()
    first: list[int] = []

    def first_turn(messages: list[BaseMessage]) -> AIMessage:
        # Asked again for its first turn, this model would charge 999 instead of 120.
        first.append(1)
        return calls(
            ("charge_card", {"customer": "ada", "amount": 120 if len(first) == 1 else 999})
        )

    model = script(first_turn, text("charged"))
    saga = shop.saga(model)
    async with shop.app(sqlite_url, saga) as app:
        with FaultInjector() as faults:
            faults.crash("charge_card", when="before_call")  # the answer is journaled already
            worker = app.worker(worker_id="w1")
            await worker.start()
            handle = await app.start(saga, "charge ada")
            await faults.wait_for_crash()
            assert shop.log == [] and len(model.seen) == 1
            worker = await restart_worker(worker)
            assert await handle.result(timeout=10) == "charged"
            await worker.stop()
        info = await handle.describe()
    assert first == [1]  # the first turn was asked once, before the crash
    assert shop.log == [("charge_card", 120)]
    assert len(model.seen) == 2
    recorded = [e for e in info.history if e.type == "value_recorded" and e.data["name"] == "model"]
    assert len(recorded) == 2
    assert recorded[0].value["request"][0]["data"]["content"] == "charge ada"
    assert recorded[0].value["answered"] == {
        "text": None,
        "tool_calls": [
            {"id": "t1-1", "name": "charge_card", "arguments": {"customer": "ada", "amount": 120}}
        ],
    }
    assert recorded[1].value["answered"] == {"text": "charged", "tool_calls": []}
    # The model was told what the engine established, under the model's own call id.
    (told,) = tool_results(model.seen[1])
    assert (told.tool_call_id, told.content) == ("t1-1", "charge-ada-120")


@pytest.mark.slow
def test_a_sigkill_between_the_model_answer_and_the_tool_call_replays_the_answer(
    tmp_path: Path,
) -> None:
    """A real worker process dies by SIGKILL after the model's answer was journaled and before
    the tool it asked for ran; a new process resumes the run from the journal."""
    app_file = Path(__file__).with_name("langchain_app.py")
    db, log = tmp_path / "agent.db", tmp_path / "agent.log"
    env = {**os.environ, "LANGCHAIN_APP_LOG": str(log)}

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


async def test_a_write_tool_key_is_structural_the_same_on_a_retry_and_after_a_restart(
    sqlite_url: str,
) -> None:
    shop = Shop()
    model = script(
        calls(("find_slots", {"day": "mon"}), ("book_slot", {"slot": "09:00"})),
        calls(("charge_card", {"customer": "ada", "amount": 120}), turn=2),
        text("booked and charged"),
    )
    saga = shop.saga(model)
    shop.flaky.add("book_slot")  # a transient failure: retried under its key
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
        assert [key for tool, key in shop.keys if tool == name] == [expected, expected]
    assert steps["book_slot"].attempts == 2
    assert len(model.seen) == 3  # the restart replayed the two recorded answers
    assert shop.log.count(("find_slots", "mon")) == 1  # the read was recorded, not repeated


async def test_a_write_that_fails_for_good_compensates_the_writes_done_in_reverse(
    sqlite_url: str,
) -> None:
    shop = Shop()
    model = script(
        calls(("book_slot", {"slot": "09:00"})),
        calls(("charge_card", {"customer": "ada", "amount": 120}), turn=2),
        calls(("add_to_calendar", {"slot": "09:00"}), turn=3),
        text("never reached"),
    )
    saga = shop.saga(model)
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
    assert len(model.seen) == 3  # the failure ended the agent: no turn after it


async def test_parallel_calls_run_as_the_order_rule_allows_the_sms_waits_for_the_charge(
    sqlite_url: str,
) -> None:
    """One AIMessage asks for book, SMS and charge at once (LangGraph runs the calls side by
    side) and the charge fails: the SMS, which cannot be undone, never goes out, and the
    booking is compensated."""
    shop = Shop()
    model = script(
        calls(
            ("book_slot", {"slot": "09:00"}),
            ("send_sms", {"to": "ada", "body": "see you at 9"}),
            ("charge_card", {"customer": "ada", "amount": 120}),
        ),
        text("never reached"),
    )
    saga = shop.saga(model)
    shop.declined = True
    async with shop.app(sqlite_url, saga) as app, app.worker():
        handle = await app.start(saga, "book, text and charge")
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=10)
        info = await handle.describe()
    # The turn ran the writes that can be undone first: the SMS was never even a step.
    assert [(s.position, s.name) for s in info.steps] == [(1, "book_slot"), (2, "charge_card")]
    assert ("send_sms", "see you at 9") not in shop.log
    assert shop.effects() == [("book_slot", "09:00"), ("cancel_slot", "booking-09:00")]


async def test_a_refusal_reaches_the_model_as_an_error_tool_message(sqlite_url: str) -> None:
    """The SMS cannot be undone; a booking asked for after it breaks the order rule and is
    refused with the reason, nothing run; an unknown tool is refused too."""
    shop = Shop()
    model = script(
        calls(("send_sms", {"to": "ada", "body": "hi"})),
        calls(("book_slot", {"slot": "09:00"}), ("book_slot", {"when": 9}), turn=2),
        text("done"),
    )
    saga = shop.saga(model)
    async with shop.app(sqlite_url, saga) as app, app.worker():
        handle = await app.start(saga, "text then book")
        assert await handle.result(timeout=10) == "done"
    assert shop.effects() == [("send_sms", "hi")]
    refused = tool_results(model.seen[2])[-2:]
    assert [m.status for m in refused] == ["error", "error"]
    assert "refused, nothing ran" in str(refused[0].content)
    assert "order" in str(refused[0].content)


async def test_a_write_needing_approval_waits_for_storno_bound_to_its_arguments(
    sqlite_url: str,
) -> None:
    shop = Shop()
    model = script(calls(("charge_card", {"customer": "ada", "amount": 800})), text("charged"))
    saga = shop.saga(model)
    async with shop.app(sqlite_url, saga) as app, app.worker():
        handle = await app.start(saga, "charge ada 800")
        for _ in range(1000):
            if await handle.status() is storno.RunStatus.WAITING:
                break
            await asyncio.sleep(0.01)
        assert shop.log == []
        info = await handle.describe()
        assert await app.approve(handle.run_id, by="ops")
        assert await handle.result(timeout=10) == "charged"
    assert shop.log == [("charge_card", 800)]
    waits = [e for e in info.history if e.type == "signal_wait_started" and e.data.get("approval")]
    assert [w.data["subject"] for w in waits] == [
        {"tool": "charge_card", "arguments": {"customer": "ada", "amount": 800}}
    ]
    assert len(model.seen) == 2  # the wait replayed the run: the model was asked once a turn


async def test_the_middleware_outside_a_saga_says_where_it_belongs() -> None:
    shop = Shop()
    model = script(calls(("find_slots", {"day": "mon"})), text("no"))
    agent = create_agent(model, middleware=[storno_lc.StornoMiddleware(shop.tools)])
    with pytest.raises(storno.ConfigurationError, match="inside a saga body"):
        await agent.ainvoke({"messages": [("user", "hello")]})


async def test_with_a_checkpointer_a_replay_starts_from_the_thread_where_the_run_found_it(
    sqlite_url: str,
) -> None:
    """Both at once: LangGraph's checkpointer keeps the conversation of a thread across runs,
    storno's journal the run. A run resumed after a crash invokes the graph on the checkpoint
    the thread was at when the run began, not on what the crashed execution left there."""
    from langgraph.checkpoint.memory import InMemorySaver

    shop = Shop()
    model = script(
        text("hello ada"),  # the first run: one answer
        calls(("charge_card", {"customer": "ada", "amount": 120}), turn=2),
        text("charged"),
    )
    agent = create_agent(
        model, middleware=[storno_lc.StornoMiddleware(shop.tools)], checkpointer=InMemorySaver()
    )

    @storno.saga(name="chat_turn")
    async def chat_turn(ctx: storno.SagaContext, prompt: str) -> list[str]:
        thread = {"configurable": {"thread_id": "conversation-1"}}
        result = await storno_lc.run(ctx, agent, {"messages": [("user", prompt)]}, thread)
        return [f"{type(m).__name__}: {m.content}" for m in result["messages"]]

    async with shop.app(sqlite_url, chat_turn) as app:
        with FaultInjector() as faults:
            faults.crash("charge_card", when="before_call")
            worker = app.worker(worker_id="w1")
            await worker.start()
            first = await app.start(chat_turn, "hi")
            assert await first.result(timeout=10) == ["HumanMessage: hi", "AIMessage: hello ada"]
            handle = await app.start(chat_turn, "charge me")
            await faults.wait_for_crash()
            worker = await restart_worker(worker)
            conversation = await handle.result(timeout=10)
            await worker.stop()
    assert conversation == [
        "HumanMessage: hi",
        "AIMessage: hello ada",
        "HumanMessage: charge me",
        "AIMessage: ",
        "ToolMessage: charge-ada-120",
        "AIMessage: charged",
    ]
    assert shop.log == [("charge_card", 120)] and len(model.seen) == 3
    # The model's last answer was asked on the conversation as it is, with no repeated input.
    assert [type(m).__name__ for m in model.seen[2]] == [
        "HumanMessage",
        "AIMessage",
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
    ]


async def test_a_langgraph_interrupt_does_not_stand_in_for_storno_approval(
    sqlite_url: str,
) -> None:
    """LangGraph's human in the loop stops the graph at an interrupt(); inside a saga that would
    end the body with the agent's work half done and no approval journaled. run() refuses it,
    and the booking done before it is compensated; the charge never ran."""
    from langchain.agents.middleware import HumanInTheLoopMiddleware
    from langgraph.checkpoint.memory import InMemorySaver

    shop = Shop()
    model = script(
        calls(("book_slot", {"slot": "09:00"})),
        calls(("charge_card", {"customer": "ada", "amount": 120}), turn=2),
        text("done"),
    )
    agent = create_agent(
        model,
        middleware=[
            HumanInTheLoopMiddleware(interrupt_on={"charge_card": True}),
            storno_lc.StornoMiddleware(shop.tools),
        ],
        checkpointer=InMemorySaver(),
    )

    @storno.saga(name="gated")
    async def gated(ctx: storno.SagaContext, prompt: str) -> str:
        thread = {"configurable": {"thread_id": ctx.run_id}}
        result = await storno_lc.run(ctx, agent, {"messages": [("user", prompt)]}, thread)
        return str(result["messages"][-1].content)

    async with shop.app(sqlite_url, gated) as app, app.worker():
        handle = await app.start(gated, "book and charge")
        with pytest.raises(storno.RunCompensatedError, match="interrupt"):
            await handle.result(timeout=10)
    assert shop.effects() == [("book_slot", "09:00"), ("cancel_slot", "booking-09:00")]
