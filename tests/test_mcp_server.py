"""`storno mcp`: storno served to an MCP client (the SDK's in-memory pair, and stdio).

Real SQLite files and a real worker: a run is started through the server and its id comes
back at once, it is polled until it waits for approval, and approving it takes an operator
token (refused without one, with an unknown one and with a read-only one; the history
records the token's name). Unknown sagas and bad plans are refused with what to do instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="storno[mcp] is not installed")

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.memory import create_connected_server_and_client_session

import storno
from conftest import wait_for
from mcp_app import hold, pay, refund
from storno._server._auth import Role, TokenStore
from storno.mcp_server import create_server

OPERATOR = "op-token-0123456789abcdef"
READER = "read-token-0123456789abcdef"


def _tokens() -> TokenStore:
    tokens = TokenStore()
    tokens.add(OPERATOR, Role.OPERATE, "alice")
    tokens.add(READER, Role.READ, "viewer")
    return tokens


async def call(client: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool's structured result; fails the test if the tool refused."""
    result = await client.call_tool(tool, arguments)
    assert not result.isError, result.content
    assert result.structuredContent is not None
    return result.structuredContent


async def refused(client: ClientSession, tool: str, **arguments: Any) -> str:
    """The text of a tool's refusal; fails the test if the tool did what it was asked."""
    result = await client.call_tool(tool, arguments)
    assert result.isError, result.structuredContent
    return " ".join(getattr(c, "text", "") for c in result.content)


@asynccontextmanager
async def served(tmp_path: Path, tokens: TokenStore | None = None) -> AsyncIterator[ClientSession]:
    app = storno.Storno(f"sqlite:///{tmp_path / 'mcp.db'}", sagas=[refund], steps=[hold, pay])
    server = create_server(app, tokens=_tokens() if tokens is None else tokens, worker=True)
    async with create_connected_server_and_client_session(server) as client:
        yield client
    await app.close()


async def _waiting(client: ClientSession, run_id: str) -> dict[str, Any] | None:
    run = await call(client, "get_run", run_id=run_id, history=False)
    return run["waiting_for_approval"]  # type: ignore[no-any-return]


async def test_start_poll_and_approve_with_an_operator_token(tmp_path: Path) -> None:
    async with served(tmp_path) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"start_saga", "start_plan", "get_run", "list_approvals", "approve"} <= names
        sagas = await call(client, "list_sagas")
        assert [s["name"] for s in sagas["sagas"]] == ["refund"]
        assert {s["name"]: s["kind"] for s in sagas["plan_steps"]} == {
            "hold": "compensable",
            "pay": "pivot",
        }
        started = await call(client, "start_saga", name="refund", args=[30])
        run_id = started["run_id"]
        assert started["status"] in {"pending", "running", "waiting"}  # not waited for
        wait = await wait_for(lambda: _waiting(client, run_id))
        assert wait["subject"] == {"refund": 30}
        listed = await call(client, "list_approvals")
        assert [(r["run_id"], r["digest"]) for r in listed["runs"]] == [(run_id, wait["digest"])]
        decided = await call(
            client, "approve", run_id=run_id, token=OPERATOR, digest=wait["digest"], note="ok"
        )
        assert decided == {"run_id": run_id, "approved": True, "by": "alice"}

        async def ended() -> dict[str, Any] | None:
            run = await call(client, "get_run", run_id=run_id)
            return run if run["status"] == "completed" else None

        run = await wait_for(ended)
        assert run["result"] == "refunded 30, approved by alice"
        received = [e for e in run["history"] if e["type"] == "signal_received"]
        assert [e["data"]["by"] for e in received] == ["alice"]
        assert (await call(client, "list_approvals"))["runs"] == []


async def test_approving_without_an_operator_token_is_refused(tmp_path: Path) -> None:
    async with served(tmp_path) as client:
        run_id = (await call(client, "start_saga", name="refund", args=[5]))["run_id"]
        await wait_for(lambda: _waiting(client, run_id))
        assert "no token was given" in await refused(client, "approve", run_id=run_id, token="")
        unknown = await refused(client, "approve", run_id=run_id, token="x" * 24)
        assert "the token is not known" in unknown
        read_only = await refused(client, "approve", run_id=run_id, token=READER)
        assert "'viewer' is read-only" in read_only
        assert "operator" in await refused(
            client, "reject", run_id=run_id, token=READER, reason="no"
        )
        # The read-only client may still read; the run still waits, undecided.
        assert await _waiting(client, run_id) is not None
        rejected = await call(client, "reject", run_id=run_id, token=OPERATOR, reason="fraud")
        assert rejected["by"] == "alice"

        async def compensated() -> bool:
            run = await call(client, "get_run", run_id=run_id, history=False)
            return run["status"] == "compensated"

        await wait_for(compensated)


async def test_a_server_without_operator_tokens_refuses_every_decision(tmp_path: Path) -> None:
    async with served(tmp_path, tokens=TokenStore()) as client:
        run_id = (await call(client, "start_saga", name="refund", args=[5]))["run_id"]
        await wait_for(lambda: _waiting(client, run_id))
        message = await refused(client, "approve", run_id=run_id, token=OPERATOR)
        assert "no operator tokens" in message and "STORNO_API_TOKENS" in message


async def test_an_unknown_saga_or_bad_arguments_are_refused(tmp_path: Path) -> None:
    async with served(tmp_path) as client:
        message = await refused(client, "start_saga", name="refnud", args=[1])
        assert "'refnud' is not registered" in message and "'refund'" in message
        message = await refused(client, "start_saga", name="refund", args=[1, 2])
        assert "does not accept these arguments" in message
        assert "nope" in await refused(client, "get_run", run_id="nope")


async def test_a_plan_is_checked_before_it_starts(tmp_path: Path) -> None:
    async with served(tmp_path) as client:
        bad = [
            {"step": "pay", "args": [10]},
            {"step": "hold", "args": [10]},
            {"step": "ship", "args": []},
        ]
        message = await refused(client, "start_plan", steps=bad)
        assert "nothing ran" in message
        assert "'ship' is not a registered step" in message
        assert "'hold' is compensable but stands after #1 'pay'" in message
        good = [{"step": "hold", "args": [10]}, {"step": "pay", "args": [10]}]
        run_id = (await call(client, "start_plan", steps=good))["run_id"]

        async def result() -> Any:
            run = await call(client, "get_run", run_id=run_id, history=False)
            return run["result"] if run["status"] == "completed" else None

        assert await wait_for(result) == ["held 10", "paid 10"]


async def test_storno_mcp_over_stdio(tmp_path: Path) -> None:
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "STORNO_API_TOKENS": f"alice:{OPERATOR}",
        "STORNO_API_READ_TOKENS": f"viewer:{READER}",
        "PYTHONPATH": str(tests),
    }
    env.pop("STORNO_URL", None)
    db = f"sqlite:///{tmp_path / 'stdio.db'}"
    command = ["-m", "storno", "mcp", "--app", "mcp_app:app", "--db", db, "--worker"]
    params = StdioServerParameters(command=sys.executable, args=command, env=env, cwd=tmp_path)
    with (tmp_path / "stderr.log").open("w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as client,
        ):
            await client.initialize()
            run_id = (await call(client, "start_saga", name="refund", args=[7]))["run_id"]
            await wait_for(lambda: _waiting(client, run_id), timeout=20)
            assert "read-only" in await refused(client, "approve", run_id=run_id, token=READER)
            await call(client, "approve", run_id=run_id, token=OPERATOR)

            async def ended() -> Any:
                run = await call(client, "get_run", run_id=run_id, history=False)
                return run["result"] if run["status"] == "completed" else None

            assert await wait_for(ended, timeout=20) == "refunded 7, approved by alice"
    log = (tmp_path / "stderr.log").read_text()
    assert OPERATOR not in log and READER not in log, log
    async with storno.Storno(db) as app:
        assert (await app.describe(run_id)).status is storno.RunStatus.COMPLETED
