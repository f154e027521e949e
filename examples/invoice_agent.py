"""The invoicing agent of seed 001: update the CRM, create the invoice, tell the team in Slack.
The model asks for all three at once; the invoice fails. The Slack message, which cannot be
taken back, waits for the writes that can be undone, so it is never sent, and the CRM update
is compensated: nobody is told "invoice sent" about an invoice that does not exist.

The model is scripted (no network). Run it with ``python examples/invoice_agent.py``.
"""

from __future__ import annotations

import asyncio
import sys

import storno
from storno import agents

Call, Turn = agents.ToolCall, agents.ModelTurn
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


def model() -> agents.ScriptedModel:
    return agents.ScriptedModel(
        [
            Turn(
                tool_calls=[
                    Call(
                        "a", "post_slack", {"channel": "#billing", "text": "Invoice sent to ACME"}
                    ),
                    Call("b", "update_crm", {"account": "ACME", "stage": "invoiced"}),
                    Call("c", "create_invoice", {"account": "ACME", "amount": 1200}),
                ]
            ),
            Turn(text="done"),
        ]
    )


@storno.saga
async def invoice_agent(ctx: storno.SagaContext, request: str) -> str:
    return await agents.run_agent(ctx, model(), tools, request)


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
