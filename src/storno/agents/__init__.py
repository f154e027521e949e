"""Agents on storno: tools declared once, model decisions journaled, writes as saga steps.

A tool is declared in a :class:`ToolRegistry` as a read or as a write of a step kind, with its
compensation, read-back, retry policy and approval policy. Inside a saga body,
:func:`decide` journals a model's answer, and :func:`call_tool` / :func:`call_tools` run the
calls it asks for: each write is a step at the run's next position, keyed by the run, the
position and the tool (never by the model's call id or arguments), refused with a reason the
model can act on where the order rule forbids it, and approved by an operator where its policy
asks, bound to its arguments. :func:`run_agent` is a loop of storno's own for any model behind
a small callable; ``storno.agents.pydantic_ai``, ``storno.agents.openai_agents`` and
``storno.agents.langchain`` route those frameworks' loops through the same operations, and
``storno.agents.mcp`` registers an MCP server's tools as the user classifies them.
"""

from storno.agents._calls import ToolCall, ToolOutcome, call_tool, call_tools, decide
from storno.agents._loop import Model, ModelTurn, ScriptedModel, run_agent
from storno.agents._plans import Finding, PlanReport, check_plan, plan_schema, run_plan
from storno.agents._tools import Approval, Tool, ToolContext, ToolRegistry

__all__ = [
    "ToolRegistry",
    "Tool",
    "ToolContext",
    "Approval",
    "ToolCall",
    "ToolOutcome",
    "decide",
    "call_tool",
    "call_tools",
    "ModelTurn",
    "Model",
    "ScriptedModel",
    "run_agent",
    "plan_schema",
    "check_plan",
    "run_plan",
    "PlanReport",
    "Finding",
]
