"""The invoicing agent of seed 001 as a LangChain agent (``create_agent``): update the CRM,
create the invoice, tell the team in Slack. The model asks for all three at once; the invoice
fails. The Slack message, which cannot be taken back, waits for the writes that can be undone,
so it is never sent, and the CRM update is compensated.

``StornoMiddleware`` journals each model answer (``#N model: ...`` in ``storno show``) and runs
the registry's tools as saga steps. The model is scripted (LangChain's fake chat model, no
network). Run it with ``python examples/invoice_agent_langchain.py`` (needs
``storno[langchain]``).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

import storno
from storno import agents
from storno.agents import langchain as storno_lc

ledger: list[str] = []
tools = agents.ToolRegistry()


@tools.write(kind="compensable")
def update_crm(ctx: storno.StepContext, account: str, stage: str) -> str:
    """Move an account to a stage in the CRM."""
    ledger.append(f"crm: {account} -> {stage}")
    return "crm-ok"


@update_crm.compensation
def restore_crm(ctx: storno.CompensationContext[str], account: str, stage: str) -> None:
    ledger.append(f"crm: {account} stage restored")


@tools.write(kind="compensable")
def create_invoice(ctx: storno.StepContext, account: str, amount: int) -> str:
    """Create and send an invoice (in euros)."""
    raise storno.TerminalError("the invoicing API refuses: the account has no billing address")


@create_invoice.compensation
def void_invoice(ctx: storno.CompensationContext[str], account: str, amount: int) -> None:
    ledger.append(f"invoice for {account} voided")


@tools.write(kind="noncompensable")
def post_slack(ctx: storno.StepContext, channel: str, text: str) -> str:
    """Post to a Slack channel; people read it, so it cannot be taken back."""
    ledger.append(f"slack {channel}: {text}")
    return "posted"


class ScriptedChat(GenericFakeChatModel):
    """LangChain's fake chat model, taking tools as a real one does."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self


def call(id: str, name: str, **args: Any) -> dict[str, Any]:
    return {"id": id, "name": name, "args": args, "type": "tool_call"}


model = ScriptedChat(
    messages=iter(
        [
            AIMessage(
                content="",
                tool_calls=[
                    call("a", "post_slack", channel="#billing", text="Invoice sent to ACME"),
                    call("b", "update_crm", account="ACME", stage="invoiced"),
                    call("c", "create_invoice", account="ACME", amount=1200),
                ],
            ),
            AIMessage(content="done"),
        ]
    )
)
agent = create_agent(model, middleware=[storno_lc.StornoMiddleware(tools, name="model")])


@storno.saga
async def invoice_agent(ctx: storno.SagaContext, request: str) -> str:
    result = await storno_lc.run(ctx, agent, {"messages": [("user", request)]})
    return str(result["messages"][-1].content)


async def main(url: str) -> None:
    async with storno.Storno(url, sagas=[invoice_agent], steps=tools.steps()) as app, app.worker():
        handle = await app.start(invoice_agent, "Invoice ACME for November and tell #billing")
        try:
            await handle.result(timeout=30)
        except storno.RunCompensatedError as exc:
            print(f"compensated: {exc.error.get('message')}")
        print("\n".join(ledger))
        print(f"see it with: storno show {handle.run_id} --db {url}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///invoice-agent.db"))
