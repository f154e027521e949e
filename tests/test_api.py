"""The public API is what `storno.__all__` says, and nothing moves by accident."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import storno

EXPECTED = {
    "Storno", "RunHandle", "Worker", "RunStatus", "RunInfo", "StepInfo", "CompensationInfo",
    "HistoryEvent", "saga", "step", "Saga", "Step", "StepKind", "RetryPolicy", "SagaContext",
    "SyncSagaContext", "StepContext", "CompensationContext", "NOT_APPLIED", "NotApplied",
    "UNKNOWN", "Unknown", "Plan", "PlanStep", "validate_plan", "StornoError",
    "ConfigurationError", "PlanError", "SerializationError", "PayloadTooLargeError",
    "DeterminismError", "ArgumentMismatchError", "RunConflictError", "RunNotFoundError",
    "StoreError", "LeaseLostError", "TerminalError", "OutcomeUnknownError", "StepFailedError",
    "WaitTimeoutError", "RunFailedError", "RunCompensatedError", "CompensationFailedError",
    "NeedsAttentionError", "Approval", "RunStateError", "ChildFailedError", "SignalTimeoutError",
    "ApprovalRejectedError", "RunCancelledError", "RetryLater",
}  # fmt: skip


def test_public_names_are_pinned():
    assert set(storno.__all__) == EXPECTED
    assert len(storno.__all__) == len(EXPECTED)
    submodules = ("annotations", "testing", "server", "agents", "mcp_server", "events")
    # "@py_builtins" and "@pytest_ar": pytest rewrites asserts in packages that ship a plugin.
    public = {n for n in vars(storno) if n[0] not in "_@" and n not in submodules}
    assert public - EXPECTED == set(), "a public name is not in __all__"


SERVER = {
    "DEFAULT_STUCK_AFTER", "EventLog", "EventMetrics", "JsonFormatter", "Metrics", "Tracing",
    "configure_logging", "create_app", "find_stuck", "trace_headers",
}  # fmt: skip


def test_server_names_are_pinned():
    # storno.testing's are pinned in test_fault_kit.py.
    pytest.importorskip("starlette", reason="storno.server needs the server extra")
    import storno.server

    assert set(storno.server.__all__) == SERVER
    assert len(storno.server.__all__) == len(SERVER)
    public = {n for n in vars(storno.server) if n[0] not in "_@" and n != "annotations"}
    assert public - SERVER == set(), "a public name of storno.server is not in __all__"
    for name in SERVER:
        assert getattr(storno.server, name) is not None, name


AGENTS = {
    "ToolRegistry", "Tool", "ToolContext", "Approval", "ToolCall", "ToolOutcome", "decide",
    "call_tool", "call_tools", "ModelTurn", "Model", "ScriptedModel", "run_agent",
    "plan_schema", "check_plan", "run_plan", "PlanReport", "Finding",
}  # fmt: skip


def test_agents_names_are_pinned():
    import storno.agents

    assert set(storno.agents.__all__) == AGENTS
    adapters = ("annotations", "pydantic_ai", "openai_agents", "langchain", "mcp")
    public = {n for n in vars(storno.agents) if n[0] not in "_@" and n not in adapters}
    assert public - AGENTS == set(), "a public name of storno.agents is not in __all__"


def test_mcp_server_names_are_pinned():
    pytest.importorskip("mcp", reason="storno.mcp_server needs the mcp extra")
    import storno.mcp_server

    assert storno.mcp_server.__all__ == ["create_server"]


def test_every_error_descends_from_one_root():
    errors = [getattr(storno, n) for n in storno.__all__ if n.endswith("Error")]
    for error in errors:
        assert issubclass(error, storno.StornoError), error
    documented = inspect.getdoc(storno._errors)
    assert documented is not None
    for error in errors:
        assert error.__name__ in documented, f"{error.__name__} missing from the drawn tree"


def test_package_is_typed():
    assert (Path(storno.__file__).parent / "py.typed").exists()
