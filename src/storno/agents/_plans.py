"""Plans a model proposes up front: checked against the registry before anything runs.

A plan is a list of tool calls, each with its arguments and, optionally, the earlier calls it
depends on (``after``), in a JSON schema the registry publishes (:func:`plan_schema`).
:func:`check_plan` returns every finding in words a model can act on: unknown tools, arguments
the tool's schema refuses, a write that could not be undone for want of a compensation, the
order rule, dependencies on calls that do not come earlier, and the calls that will need an
operator's approval. :func:`run_plan` runs a plan that passes, in its order, on the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from storno._context import SagaContext
from storno._errors import PlanError
from storno._model import StepKind
from storno.agents._calls import ToolCall, ToolOutcome, call_tool
from storno.agents._tools import ToolRegistry

__all__ = ["Finding", "PlanReport", "check_plan", "plan_schema", "run_plan"]

FindingKind = Literal[
    "malformed", "unknown_tool", "bad_arguments", "no_compensation", "order", "dependency",
    "approval",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing wrong with (or worth knowing about) a plan; ``call`` counts from 1."""

    kind: FindingKind
    message: str
    call: int | None = None
    tool: str | None = None

    @property
    def blocking(self) -> bool:
        """Whether the plan cannot run as it is (an approval to come does not block it)."""
        return self.kind != "approval"


@dataclass(frozen=True, slots=True)
class PlanReport:
    """What :func:`check_plan` found; ``calls`` are the plan's calls, arguments checked."""

    findings: list[Finding]
    calls: list[ToolCall] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.blocking for f in self.findings)

    def for_model(self) -> str:
        """The findings as one text to hand back to the model for a revision."""
        if not self.findings:
            return "the plan passes"
        return "; ".join(f.message for f in self.findings)


def plan_schema(tools: ToolRegistry) -> dict[str, Any]:
    """The JSON schema of a plan over ``tools``: for a model's structured output."""
    call = {
        "type": "object",
        "properties": {
            "tool": {"enum": tools.names(), "description": "The tool to call."},
            "arguments": {"type": "object", "description": "Its arguments, by its schema."},
            "after": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1},
                "description": "Earlier calls (counted from 1) this one needs the results of.",
            },
        },
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"steps": {"type": "array", "items": call, "minItems": 1}},
        "required": ["steps"],
        "additionalProperties": False,
    }


def check_plan(tools: ToolRegistry, plan: Mapping[str, Any] | Sequence[Any]) -> PlanReport:
    """Every finding about ``plan`` (``{"steps": [...]}`` or the list of calls itself)."""
    steps = plan.get("steps") if isinstance(plan, Mapping) else plan
    if not isinstance(steps, Sequence) or isinstance(steps, str) or not steps:
        return PlanReport([Finding("malformed", 'a plan is a non-empty list of calls ("steps")')])
    findings: list[Finding] = []
    calls: list[ToolCall] = []
    kinds: list[tuple[int, str, StepKind]] = []
    for number, raw in enumerate(steps, 1):
        if not isinstance(raw, Mapping) or not isinstance(raw.get("tool"), str):
            findings.append(
                Finding("malformed", f'call #{number}: a call is an object with a "tool" name')
            )
            continue
        name = raw["tool"]
        tool = tools.get(name)
        if tool is None:
            known = ", ".join(tools.names()) or "none"
            message = f"call #{number}: there is no tool named {name!r}; the tools are: {known}"
            findings.append(Finding("unknown_tool", message, number, name))
            continue
        for after in raw.get("after") or []:
            if not isinstance(after, int) or not 1 <= after < number:
                message = (
                    f"call #{number} ({name}) depends on {after!r}, which is not an earlier "
                    f"call: list calls after the ones they need"
                )
                findings.append(Finding("dependency", message, number, name))
        try:
            arguments = tool.check(raw.get("arguments", {}))
        except ValueError as exc:
            findings.append(Finding("bad_arguments", f"call #{number}: {exc}", number, name))
            continue
        calls.append(ToolCall(str(number), name, arguments))
        if tool.step is None:
            continue
        if tool.step.kind is StepKind.COMPENSABLE and tool.step.compensate_fn is None:
            message = (
                f"call #{number} ({name}) is a compensable write without a compensation: it "
                f"could not be undone if a later call failed"
            )
            findings.append(Finding("no_compensation", message, number, name))
        if tool.needs_approval(arguments):
            message = f"call #{number} ({name}) needs an operator's approval for these arguments"
            findings.append(Finding("approval", message, number, name))
        kinds.append((number, name, tool.step.kind))
    findings.extend(_order(kinds))
    return PlanReport(findings, calls)


def _order(kinds: list[tuple[int, str, StepKind]]) -> list[Finding]:
    """``compensable* pivot? (retryable | noncompensable)*`` over the plan's writes."""
    found: list[Finding] = []
    forward_only: tuple[int, str] | None = None
    pivot: tuple[int, str] | None = None
    for number, name, kind in kinds:
        if kind is StepKind.COMPENSABLE and forward_only is not None:
            message = (
                f"call #{number} ({name}) can be undone but comes after call #{forward_only[0]} "
                f"({forward_only[1]}), which cannot: put every write that can be undone first"
            )
            found.append(Finding("order", message, number, name))
        if kind is StepKind.PIVOT:
            if pivot is not None:
                message = (
                    f"call #{number} ({name}) is a second pivot after call #{pivot[0]} "
                    f"({pivot[1]}): a plan has at most one point of no return"
                )
                found.append(Finding("order", message, number, name))
            elif forward_only is not None:
                message = (
                    f"call #{number} ({name}) is the pivot but comes after call "
                    f"#{forward_only[0]} ({forward_only[1]}), which already cannot be undone"
                )
                found.append(Finding("order", message, number, name))
            pivot = pivot or (number, name)
        if kind is not StepKind.COMPENSABLE and forward_only is None:
            forward_only = (number, name)
    return found


async def run_plan(
    ctx: SagaContext, tools: ToolRegistry, plan: Mapping[str, Any] | Sequence[Any]
) -> list[ToolOutcome]:
    """Check ``plan`` and run it in its order in this saga body; a plan with blocking findings
    raises :class:`storno.PlanError` naming them, and nothing runs. A write that fails for good
    raises, and the writes done so far are compensated."""
    report = check_plan(tools, plan)
    blocking = [f.message for f in report.findings if f.blocking]
    if blocking:
        raise PlanError("the plan was refused, nothing ran: " + "; ".join(blocking), blocking)
    return [await call_tool(ctx, tools, call) for call in report.calls]
