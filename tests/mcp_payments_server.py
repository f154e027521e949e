"""A fake payments API as a FastMCP server: charges dedupe by the storno key in ``_meta``.

Run as a program it serves over stdio; its ledger is then the JSON file named by argv[1].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
from mcp.server.fastmcp import Context, FastMCP
from mcp.types import ToolAnnotations


class Payments:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.charges: dict[str, dict[str, Any]] = {}  # key -> charge
        self.refunds: list[str] = []
        self.keys_seen: list[str | None] = []
        self.fail_after_landing = 0  # the next n charges land, then raise
        self.deleted: list[str] = []
        self.refund_meta: list[dict[str, Any]] = []
        self.stall_after_landing = 0  # the next n charges land, then answer too late
        self.load()

    def load(self) -> None:
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text())
            self.charges, self.refunds, self.keys_seen = (
                data["charges"],
                data["refunds"],
                data["keys_seen"],
            )
            self.fail_after_landing = data["fail_after_landing"]

    def save(self) -> None:
        if self.path is not None:
            data = {
                "charges": self.charges,
                "refunds": self.refunds,
                "keys_seen": self.keys_seen,
                "fail_after_landing": self.fail_after_landing,
            }
            self.path.write_text(json.dumps(data))


def key_of(ctx: Context[Any, Any, Any]) -> str | None:
    meta = ctx.request_context.meta
    if meta is None:
        return None
    return (meta.model_extra or {}).get("storno/idempotency_key")


def make_server(payments: Payments) -> FastMCP:
    server = FastMCP("payments")

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def balance(customer: str) -> int:
        """The customer's balance in euros."""
        payments.load()
        charged = sum(
            c["amount"]
            for c in payments.charges.values()
            if c["customer"] == customer and c["id"] not in payments.refunds
        )
        return 1000 - charged

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False))
    async def charge(customer: str, amount: int, ctx: Context[Any, Any, Any]) -> dict[str, Any]:
        """Charge the customer's card (in euros)."""
        payments.load()
        key = key_of(ctx)
        payments.keys_seen.append(key)
        if key is not None and key in payments.charges:
            payments.save()
            return payments.charges[key]  # a repeat: the charge that landed
        made = {"id": f"ch-{len(payments.charges) + 1}", "customer": customer, "amount": amount}
        payments.charges[key or made["id"]] = made
        if payments.fail_after_landing:
            payments.fail_after_landing -= 1
            payments.save()
            raise RuntimeError("gateway timeout")
        payments.save()
        if payments.stall_after_landing:
            payments.stall_after_landing -= 1
            await anyio.sleep(30)  # landed; the answer never comes in time
        return made

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True))
    def refund(charge_id: str, ctx: Context[Any, Any, Any]) -> str:
        """Refund a charge."""
        payments.load()
        extra = (ctx.request_context.meta.model_extra or {}) if ctx.request_context.meta else {}
        payments.refund_meta.append(dict(extra))
        payments.refunds.append(charge_id)
        payments.save()
        return f"refunded {charge_id}"

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True))
    def delete_customer(customer: str) -> str:
        """Delete a customer and everything about them."""
        payments.deleted.append(customer)
        return f"deleted {customer}"

    @server.tool()
    def ship(order: str) -> str:
        """Ship an order."""
        raise RuntimeError("the warehouse is closed")

    @server.tool()
    def cancel_shipment(order: str) -> str:
        """Cancel a shipment."""
        return f"cancelled {order}"

    @server.tool()
    def find_charge(ctx: Context[Any, Any, Any]) -> dict[str, Any] | None:
        """The charge made under the caller's key, if any."""
        payments.load()
        return payments.charges.get(key_of(ctx) or "")

    return server


if __name__ == "__main__":
    make_server(Payments(Path(sys.argv[1]))).run("stdio")
