"""Agents on storno with a scripted model: tools declared once, decisions journaled, writes as
steps under the order rule, approvals bound to their arguments."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import storno
from storno import agents
from storno._model import forward_key
from storno.testing import FaultInjector, restart_worker
from test_cli import cli

Call, Turn = agents.ToolCall, agents.ModelTurn


def registry(ledger: list[tuple[str, Any]]) -> agents.ToolRegistry:
    tools = agents.ToolRegistry()

    @tools.read
    def find_customer(ctx: agents.ToolContext, email: str) -> dict[str, str]:
        """Look a customer up in the CRM by email."""
        ledger.append(("read", email))
        return {"id": "cus-1", "email": email}

    @tools.write(kind="compensable")
    def update_crm(ctx: storno.StepContext, customer: str, stage: str) -> str:
        """Move a customer to a stage in the CRM."""
        ledger.append(("crm", ctx.idempotency_key))
        return f"crm-{stage}"

    @update_crm.compensation
    def revert_crm(ctx: storno.CompensationContext[str], customer: str, stage: str) -> None:
        ledger.append(("crm-undo", ctx.forward_key))

    @tools.write(kind="compensable", approval=lambda args: args["amount"] > 500)
    def create_invoice(ctx: storno.StepContext, customer: str, amount: int) -> str:
        """Create an invoice; amounts over 500 need an operator's approval."""
        if amount == 13:
            raise storno.TerminalError("the invoicing API refuses this customer")
        ledger.append(("invoice", amount))
        return f"inv-{amount}"

    @create_invoice.compensation
    def void_invoice(ctx: storno.CompensationContext[str], customer: str, amount: int) -> None:
        ledger.append(("invoice-void", amount))

    @tools.write(kind="noncompensable")
    def post_slack(ctx: storno.StepContext, text: str) -> str:
        """Tell the team in Slack (a message people read: it cannot be taken back)."""
        ledger.append(("slack", text))
        return "posted"

    return tools


def agent_saga(tools: agents.ToolRegistry, model: agents.Model) -> storno.Saga[[str], str]:
    @storno.saga(name="invoicing_agent")
    async def invoicing_agent(ctx: storno.SagaContext, request: str) -> str:
        return await agents.run_agent(ctx, model, tools, request)

    return invoicing_agent


def app_for(tmp_path: Path, saga: storno.Saga[..., Any], tools: agents.ToolRegistry) -> Any:
    return storno.Storno(f"sqlite:///{tmp_path / 'agents.db'}", sagas=[saga], steps=tools.steps())


def test_schemas_show_typed_parameters_and_never_the_key() -> None:
    tools = registry([])
    schemas = {s["name"]: s for s in tools.schemas()}
    invoice = schemas["create_invoice"]["parameters"]
    assert invoice["required"] == ["customer", "amount"]
    assert invoice["properties"]["amount"]["type"] == "integer"
    assert "ctx" not in str(schemas) and "idempotency" not in str(schemas)
    assert schemas["post_slack"]["description"].startswith("Tell the team")
    assert tools.get("find_customer") is not None and tools.get("find_customer").kind == "read"  # type: ignore[union-attr]
    with pytest.raises(storno.ConfigurationError, match="no docstring"):

        @tools.read
        def undocumented(ctx: agents.ToolContext) -> None:
            pass


async def test_parallel_writes_wait_for_the_undoable_ones_and_a_failure_compensates(
    tmp_path: Path,
) -> None:
    ledger: list[tuple[str, Any]] = []
    tools = registry(ledger)
    model = agents.ScriptedModel(
        [
            Turn(
                tool_calls=[
                    Call("c1", "post_slack", {"text": "invoice sent"}),
                    Call("c2", "update_crm", {"customer": "cus-1", "stage": "billed"}),
                    Call("c3", "create_invoice", {"customer": "cus-1", "amount": 13}),
                ]
            )
        ]
    )
    saga = agent_saga(tools, model)
    async with app_for(tmp_path, saga, tools) as app, app.worker():
        handle = await app.start(saga, "bill cus-1")
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=10)
    kinds = [k for k, _ in ledger]
    assert "slack" not in kinds, "the message went out although the invoice failed"
    assert kinds == ["crm", "crm-undo"]


async def test_a_write_key_is_structural_and_the_model_is_not_asked_again_after_a_crash(
    tmp_path: Path,
) -> None:
    ledger: list[tuple[str, Any]] = []
    tools = registry(ledger)
    turns = [
        Turn(tool_calls=[Call("x1", "update_crm", {"customer": "cus-1", "stage": "won"})]),
        Turn(text="done"),
    ]
    # A model asked a second time for its first turn would answer otherwise.
    model = agents.ScriptedModel(turns)
    saga = agent_saga(tools, model)
    with FaultInjector() as faults:
        faults.crash("update_crm", when="before_call")
        async with app_for(tmp_path, saga, tools) as app:
            worker = app.worker(worker_id="w1", poll_interval=0.05)
            await worker.start()
            handle = await app.start(saga, "mark cus-1 won")
            await faults.wait_for_crash()
            worker = await restart_worker(worker)
            assert await handle.result(timeout=10) == "done"
            await worker.stop()
            info = await handle.describe()
    assert model.calls == 2, "the model was asked again for a decision already made"
    crm = next(s for s in info.steps if s.name == "update_crm")
    assert crm.idempotency_key == forward_key(handle.run_id, crm.position, "update_crm")
    assert ledger == [("crm", crm.idempotency_key)]


async def test_the_order_rule_refuses_a_write_and_the_model_sees_why(tmp_path: Path) -> None:
    ledger: list[tuple[str, Any]] = []
    tools = registry(ledger)
    seen: list[Any] = []

    def after_refusal(messages: list[dict[str, Any]]) -> agents.ModelTurn:
        seen.append(messages[-1]["content"])
        return Turn(text="I will not update the CRM after posting")

    model = agents.ScriptedModel(
        [
            Turn(tool_calls=[Call("a", "post_slack", {"text": "hello"})]),
            Turn(tool_calls=[Call("b", "update_crm", {"customer": "cus-1", "stage": "x"})]),
            after_refusal,
        ]
    )
    saga = agent_saga(tools, model)
    async with app_for(tmp_path, saga, tools) as app, app.worker():
        assert "will not" in await app.run(saga, "post, then update")
    assert [k for k, _ in ledger] == ["slack"]
    assert "refused, nothing ran" in seen[0]["error"]
    assert "'post_slack', which cannot" in seen[0]["error"]


async def test_bad_arguments_and_unknown_tools_are_answered_not_run(tmp_path: Path) -> None:
    tools = registry([])
    answers: list[Any] = []

    def look(messages: list[dict[str, Any]]) -> agents.ModelTurn:
        answers.extend(m["content"] for m in messages if m["role"] == "tool")
        return Turn(text="ok")

    model = agents.ScriptedModel(
        [
            Turn(
                tool_calls=[
                    Call("1", "create_invoice", {"customer": "c", "amount": "lots"}),
                    Call("2", "delete_everything", {}),
                ]
            ),
            look,
        ]
    )
    saga = agent_saga(tools, model)
    async with app_for(tmp_path, saga, tools) as app, app.worker():
        await app.run(saga, "try")
    assert "bad arguments for 'create_invoice'" in answers[0]["error"]
    assert "no tool named 'delete_everything'" in answers[1]["error"]


async def test_an_approval_is_bound_to_the_arguments_it_approved(tmp_path: Path) -> None:
    ledger: list[tuple[str, Any]] = []
    tools = registry(ledger)
    model = agents.ScriptedModel(
        [
            Turn(tool_calls=[Call("1", "create_invoice", {"customer": "c", "amount": 900})]),
            Turn(tool_calls=[Call("2", "create_invoice", {"customer": "c", "amount": 950})]),
            Turn(text="invoiced"),
        ]
    )
    saga = agent_saga(tools, model)

    async def waiting(app: storno.Storno, run_id: str, amount: int) -> storno.RunInfo:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            info = await app.describe(run_id)
            asked = [e for e in info.history if e.type == "signal_wait_started"]
            subject = asked[-1].data["subject"] if asked else None
            if info.status is storno.RunStatus.WAITING and subject["arguments"]["amount"] == amount:
                return info
            assert loop.time() < deadline, f"the run never asked to approve {amount}"
            await asyncio.sleep(0.02)

    async with app_for(tmp_path, saga, tools) as app, app.worker():
        handle = await app.start(saga, "invoice c")
        info = await waiting(app, handle.run_id, 900)
        asked = [e for e in info.history if e.type == "signal_wait_started"][-1].data
        assert asked["subject"] == {
            "tool": "create_invoice",
            "arguments": {"customer": "c", "amount": 900},
        }
        with pytest.raises(storno.RunStateError, match="asks to approve"):
            await app.approve(handle.run_id, by="maria", digest="not-what-was-shown")
        await app.approve(handle.run_id, by="maria", digest=asked["digest"])
        # The model then asks for another amount: that is a new request, not yet approved.
        info = await waiting(app, handle.run_id, 950)
        assert ("invoice", 950) not in ledger
        second = [e for e in info.history if e.type == "signal_wait_started"][-1].data
        assert second["digest"] != asked["digest"]
        # The first approval's digest does not cover the second request, from the CLI too.
        url = f"sqlite:///{tmp_path / 'agents.db'}"
        stale = await asyncio.to_thread(
            cli, "approve", handle.run_id, "--digest", asked["digest"], "--db", url, cwd=tmp_path
        )
        assert stale.returncode == 1 and "asks to approve" in stale.stderr
        shown = await asyncio.to_thread(cli, "show", handle.run_id, "--db", url, cwd=tmp_path)
        assert f"(digest {second['digest']})" in shown.stdout
        await app.approve(handle.run_id, by="maria")
        assert await handle.result(timeout=10) == "invoiced"
    assert [x for x in ledger if x[0] == "invoice"] == [("invoice", 900), ("invoice", 950)]


async def test_a_rejected_write_compensates_the_writes_before_it(tmp_path: Path) -> None:
    ledger: list[tuple[str, Any]] = []
    tools = registry(ledger)
    model = agents.ScriptedModel(
        [
            Turn(tool_calls=[Call("1", "update_crm", {"customer": "c", "stage": "billing"})]),
            Turn(tool_calls=[Call("2", "create_invoice", {"customer": "c", "amount": 5000})]),
            Turn(text="never"),
        ]
    )
    saga = agent_saga(tools, model)
    async with app_for(tmp_path, saga, tools) as app, app.worker():
        handle = await app.start(saga, "invoice c")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await handle.status()) is not storno.RunStatus.WAITING:
            assert loop.time() < deadline
            await asyncio.sleep(0.02)
        await app.reject(handle.run_id, by="maria", reason="too much")
        with pytest.raises(storno.RunCompensatedError):
            await handle.result(timeout=10)
    assert [k for k, _ in ledger] == ["crm", "crm-undo"]


# --- plans ---------------------------------------------------------------------------------


def plan_tools() -> agents.ToolRegistry:
    tools = registry([])

    @tools.write(kind="compensable")
    def hold_room(ctx: storno.StepContext, room: str) -> str:
        """Hold a room (no compensation declared: a mistake the plan check must catch)."""
        return room

    @tools.write(kind="pivot")
    def capture_payment(ctx: storno.StepContext, amount: int) -> str:
        """Capture the payment: the point of no return."""
        return "captured"

    return tools


def test_the_plan_schema_names_the_registry_tools() -> None:
    schema = agents.plan_schema(plan_tools())
    call = schema["properties"]["steps"]["items"]
    assert "create_invoice" in call["properties"]["tool"]["enum"]
    assert call["required"] == ["tool", "arguments"]


def test_a_plan_check_reports_each_kind_of_finding() -> None:
    tools = plan_tools()
    report = agents.check_plan(
        tools,
        [
            {"tool": "post_slack", "arguments": {"text": "starting"}},
            {"tool": "update_crm", "arguments": {"customer": "c", "stage": "x"}},
            {"tool": "teleport", "arguments": {}},
            {"tool": "create_invoice", "arguments": {"customer": "c", "amount": "many"}},
            {"tool": "hold_room", "arguments": {"room": "A"}, "after": [9]},
            {"tool": "capture_payment", "arguments": {"amount": 1}},
            {"tool": "capture_payment", "arguments": {"amount": 2}},
        ],
    )
    kinds = sorted({f.kind for f in report.findings})
    assert kinds == ["bad_arguments", "dependency", "no_compensation", "order", "unknown_tool"]
    assert not report.ok
    text = report.for_model()
    assert "call #2 (update_crm) can be undone but comes after call #1 (post_slack)" in text
    assert "no tool named 'teleport'" in text and "second pivot" in text
    approvals = agents.check_plan(
        tools,
        {"steps": [{"tool": "create_invoice", "arguments": {"customer": "c", "amount": 900}}]},
    )
    assert approvals.ok and [f.kind for f in approvals.findings] == ["approval"]
    assert agents.check_plan(tools, []).findings[0].kind == "malformed"


async def test_a_plan_that_passes_runs_and_one_that_fails_runs_nothing(tmp_path: Path) -> None:
    ledger: list[tuple[str, Any]] = []
    tools = registry(ledger)
    good = [
        {"tool": "update_crm", "arguments": {"customer": "c", "stage": "won"}},
        {"tool": "post_slack", "arguments": {"text": "won c"}, "after": [1]},
    ]
    bad = list(reversed(good))

    @storno.saga
    async def planned(ctx: storno.SagaContext, plan: list[dict[str, Any]]) -> list[Any]:
        return [o.value for o in await agents.run_plan(ctx, tools, plan)]

    async with app_for(tmp_path, planned, tools) as app, app.worker():
        assert await app.run(planned, good) == ["crm-won", "posted"]
        with pytest.raises(storno.RunCompensatedError, match="the plan was refused"):
            await app.run(planned, bad)
    assert [k for k, _ in ledger] == ["crm", "slack"]
