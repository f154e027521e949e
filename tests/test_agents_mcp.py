"""An MCP server's tools as storno tools, over the SDK's in-memory transport and over stdio
with the server in a subprocess: the user's classification decides, the step's key reaches
the server in ``_meta``, compensations call the server's own undo tools."""

from __future__ import annotations

import asyncio
import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the MCP SDK is not installed (storno[mcp])")

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.memory import create_connected_server_and_client_session

import storno
from mcp_payments_server import Payments, make_server
from storno import agents
from storno.agents import mcp as storno_mcp

Call, Turn = agents.ToolCall, agents.ModelTurn
HERE = Path(__file__).resolve().parent
ONCE = storno.RetryPolicy(maximum_attempts=1)
QUICK = storno.RetryPolicy(initial_interval=0.01, maximum_attempts=3)


def classification() -> dict[str, storno_mcp.Classification]:
    return {
        "balance": storno_mcp.read(),
        "charge": storno_mcp.write(
            "compensable",
            compensate="refund",
            compensate_arguments={"charge_id": "result.id"},
            retry=QUICK,
        ),
        "ship": storno_mcp.write("compensable", compensate="cancel_shipment", retry=ONCE),
    }


async def run_agent(
    url: str, tools: agents.ToolRegistry, turns: list[Any]
) -> tuple[storno.RunStatus, list[dict[str, Any]]]:
    """Run a scripted agent over ``tools``; its status and the messages it was shown."""
    shown: list[dict[str, Any]] = []

    def last(messages: list[dict[str, Any]]) -> Turn:
        shown.extend(messages)
        return Turn(text="done")

    model = agents.ScriptedModel([*turns, last])

    @storno.saga(name="mcp_agent")
    async def mcp_agent(ctx: storno.SagaContext, prompt: str) -> str:
        return await agents.run_agent(ctx, model, tools, prompt)

    async with storno.Storno(url, sagas=[mcp_agent], steps=tools.steps()) as app, app.worker():
        handle = await app.start(mcp_agent, "pay")
        with suppress(storno.RunCompensatedError):
            await handle.result(timeout=30)
        info = await app.describe(handle.run_id)
    return info.status, shown


@asynccontextmanager
async def in_memory(payments: Payments) -> AsyncIterator[ClientSession]:
    async with create_connected_server_and_client_session(make_server(payments)) as session:
        yield session


async def test_an_unclassified_tool_is_refused_and_never_reaches_the_server(
    tmp_path: Path,
) -> None:
    payments = Payments()
    async with in_memory(payments) as session:
        tools = agents.ToolRegistry()
        await storno_mcp.register(tools, session, classification())
        status, shown = await run_agent(
            f"sqlite:///{tmp_path / 'a.db'}",
            tools,
            [
                Turn(
                    tool_calls=[
                        Call("c1", "delete_customer", {"customer": "ada"}),
                        Call("c2", "charge", {"customer": "ada"}),
                    ]
                )
            ],
        )
    assert status is storno.RunStatus.COMPLETED
    assert payments.deleted == [] and payments.keys_seen == []
    answers = {m["tool_call_id"]: m["content"] for m in shown if m.get("role") == "tool"}
    assert "refused, nothing ran: 'delete_customer' is not classified" in answers["c1"]["error"]
    assert "bad arguments for 'charge'" in answers["c2"]["error"]  # the server's schema
    assert tools.get("delete_customer") is not None and tools.steps()  # seen, not runnable


async def test_the_key_reaches_the_server_and_a_retry_after_landing_charges_once(
    tmp_path: Path,
) -> None:
    payments = Payments()
    payments.fail_after_landing = 1  # the charge lands, then the answer is an error
    async with in_memory(payments) as session:
        tools = agents.ToolRegistry()
        await storno_mcp.register(tools, session, classification())
        status, shown = await run_agent(
            f"sqlite:///{tmp_path / 'a.db'}",
            tools,
            [Turn(tool_calls=[Call("c1", "charge", {"customer": "ada", "amount": 30})])],
        )
    assert status is storno.RunStatus.COMPLETED
    first, second = payments.keys_seen
    assert first is not None and first.startswith("st-") and first == second
    assert list(payments.charges) == [first]
    told = next(m for m in shown if m.get("role") == "tool")["content"]
    assert told == {"id": "ch-1", "customer": "ada", "amount": 30}


async def test_a_verify_tool_reads_back_under_the_same_key_instead_of_charging_again(
    tmp_path: Path,
) -> None:
    payments = Payments()
    payments.stall_after_landing = 1  # lands, then the answer comes too late: unknown outcome
    verified = {
        **classification(),
        "charge": storno_mcp.write(
            "compensable",
            compensate="refund",
            verify="find_charge",
            retry=QUICK,
            attempt_timeout=0.5,
        ),
    }
    async with in_memory(payments) as session:
        tools = agents.ToolRegistry()
        await storno_mcp.register(tools, session, verified)
        status, shown = await run_agent(
            f"sqlite:///{tmp_path / 'a.db'}",
            tools,
            [Turn(tool_calls=[Call("c1", "charge", {"customer": "ada", "amount": 30})])],
        )
    assert status is storno.RunStatus.COMPLETED
    assert len(payments.keys_seen) == 1  # read back, not sent again
    told = next(m for m in shown if m.get("role") == "tool")["content"]
    assert told == {"id": "ch-1", "customer": "ada", "amount": 30}


async def test_a_later_failure_refunds_through_the_servers_tool_in_reverse(
    tmp_path: Path,
) -> None:
    payments = Payments()
    async with in_memory(payments) as session:
        tools = agents.ToolRegistry()
        await storno_mcp.register(tools, lambda: session, classification())
        shown: list[dict[str, Any]] = []

        def ship(messages: list[dict[str, Any]]) -> Turn:
            shown.extend(messages)
            return Turn(tool_calls=[Call("c4", "ship", {"order": "o-1"})])

        status, _ = await run_agent(
            f"sqlite:///{tmp_path / 'a.db'}",
            tools,
            [
                Turn(tool_calls=[Call("c1", "charge", {"customer": "ada", "amount": 30})]),
                Turn(tool_calls=[Call("c2", "charge", {"customer": "ada", "amount": 12})]),
                Turn(tool_calls=[Call("c3", "balance", {"customer": "ada"})]),
                ship,
            ],
        )
    assert status is storno.RunStatus.COMPENSATED
    assert payments.refunds == ["ch-2", "ch-1"]
    first, second = payments.charges  # keys, in the order charged
    assert [m["storno/forward_key"] for m in payments.refund_meta] == [second, first]
    own = {m["storno/idempotency_key"] for m in payments.refund_meta}
    assert len(own) == 2 and not own & {first, second}  # a compensation has a key of its own
    answers = {m["tool_call_id"]: m["content"] for m in shown if m.get("role") == "tool"}
    assert answers["c3"] == 1000 - 42  # the read, unwrapped from FastMCP's {"result": ...}


def test_annotations_are_reported_and_disagreements_warned() -> None:
    async def go() -> list[storno_mcp.ToolReport]:
        async with in_memory(Payments()) as session:
            tools = agents.ToolRegistry()
            mixed = {
                **classification(),
                "delete_customer": storno_mcp.read(),
                "balance": storno_mcp.write("retryable"),
            }
            return await storno_mcp.register(tools, session, mixed)

    with pytest.warns(UserWarning, match="classified as") as caught:
        rows = asyncio.run(go())
    said = [str(w.message) for w in caught]
    assert any("'delete_customer' is classified as a read" in s for s in said)
    assert any("marks it destructive" in s for s in said)
    assert any("'balance' is classified as a retryable write" in s for s in said)
    assert not any("'charge'" in s for s in said)
    by_name = {r.name: r for r in rows}
    assert str(by_name["balance"]).startswith("balance: retryable (server: readOnlyHint=True)")
    assert by_name["refund"].classification == "unclassified, refused to the model (undoes charge)"
    assert by_name["delete_customer"].classification == "read"
    assert by_name["charge"].warnings == []


def test_a_classification_file_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "payments.toml"
    path.write_text(
        '[tools.balance]\nkind = "read"\n\n'
        '[tools.charge]\nkind = "compensable"\ncompensate = "refund"\n'
        'compensate_arguments = { charge_id = "result.id" }\napproval = "always"\n'
    )
    loaded = storno_mcp.load_classification(path)
    assert loaded["balance"] == storno_mcp.read()
    charge = loaded["charge"]
    assert isinstance(charge, storno_mcp.Write) and charge.approval == "always"
    assert charge.compensate == "refund" and charge.kind is storno.StepKind.COMPENSABLE
    with pytest.raises(storno.ConfigurationError, match="needs compensate"):
        storno_mcp.load_classification({"tools": {"charge": {"kind": "compensable"}}})
    with pytest.raises(storno.ConfigurationError, match="unknown keys"):
        storno_mcp.load_classification({"charge": {"kind": "pivot", "undo": "refund"}})


async def test_a_classified_tool_the_server_lacks_is_a_configuration_error() -> None:
    async with in_memory(Payments()) as session:
        with pytest.raises(storno.ConfigurationError, match="no such tool"):
            await storno_mcp.register(
                agents.ToolRegistry(), session, {"transfer": storno_mcp.read()}
            )


async def test_over_stdio_with_the_server_in_a_subprocess(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    server = StdioServerParameters(
        command=sys.executable, args=[str(HERE / "mcp_payments_server.py"), str(ledger)]
    )
    seed = Payments(ledger)
    seed.fail_after_landing = 1
    seed.save()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the classification agrees with the annotations
        async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = agents.ToolRegistry()
            await storno_mcp.register(tools, session, classification(), prefix="pay_")
            status, _ = await run_agent(
                f"sqlite:///{tmp_path / 'a.db'}",
                tools,
                [
                    Turn(tool_calls=[Call("c1", "pay_charge", {"customer": "ada", "amount": 7})]),
                    Turn(tool_calls=[Call("c2", "pay_ship", {"order": "o-1"})]),
                ],
            )
    assert status is storno.RunStatus.COMPENSATED
    after = Payments(ledger)
    assert len(after.charges) == 1 and after.keys_seen[0] == after.keys_seen[1]
    assert after.refunds == ["ch-1"]


async def test_a_worker_dying_after_the_charge_landed_resends_it_under_the_same_key(
    tmp_path: Path,
) -> None:
    from storno.testing import FaultInjector, restart_worker

    payments = Payments()
    model = agents.ScriptedModel(
        [
            Turn(tool_calls=[Call("c1", "charge", {"customer": "ada", "amount": 30})]),
            Turn(text="done"),
        ]
    )
    async with in_memory(payments) as session:
        tools = agents.ToolRegistry()
        await storno_mcp.register(tools, lambda: session, classification())

        @storno.saga(name="mcp_crash_agent")
        async def agent(ctx: storno.SagaContext, prompt: str) -> str:
            return await agents.run_agent(ctx, model, tools, prompt)

        url = f"sqlite:///{tmp_path / 'a.db'}"
        with FaultInjector() as faults:
            faults.crash("charge", when="after_call")
            async with storno.Storno(url, sagas=[agent], steps=tools.steps()) as app:
                worker = app.worker(worker_id="w1", poll_interval=0.05)
                await worker.start()
                handle = await app.start(agent, "pay")
                await faults.wait_for_crash()
                worker = await restart_worker(worker)
                assert await handle.result(timeout=10) == "done"
                await worker.stop()
                info = await handle.describe()
    step = next(s for s in info.steps if s.name == "charge")
    assert payments.keys_seen == [step.idempotency_key, step.idempotency_key]
    assert list(payments.charges) == [step.idempotency_key]  # landed once
    assert model.calls == 2  # the decision to charge was not asked for again
