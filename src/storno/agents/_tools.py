"""The tool registry: every tool an agent may call, declared once with what it does to the world.

A *read* tool has no side effects: it is never compensated and its result is recorded, so a
replay shows the model the same thing. A *write* tool is a storno step with its kind
(compensable with its compensation, pivot, retryable, noncompensable), optional verify, retry
policy, time limits and approval policy. The registry publishes each tool's JSON schema for a
model, built from the function's typed parameters; the step's context (and so its idempotency
key) is never part of it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from storno._definitions import Step, StepFn, step
from storno._errors import ConfigurationError
from storno._model import RetryPolicy, StepKind

__all__ = ["Approval", "Tool", "ToolContext", "ToolRegistry"]

Approval = Literal["always"] | Callable[[dict[str, Any]], bool] | None
"""When a write needs an operator's approval: never (``None``), ``"always"``, or when a
predicate on its arguments says so (``lambda args: args["amount"] > 500``)."""


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a read tool is told: the run it serves and the call's position in it."""

    run_id: str
    tool: str


@dataclass(frozen=True, slots=True)
class Tool:
    """One registered tool: its function, what the model sees, and how the engine runs it."""

    name: str
    description: str
    parameters: dict[str, Any]  # the JSON schema of its arguments
    kind: str  # "read", or the StepKind of a write
    fn: Callable[..., Any]
    step: Step[..., Any] | None  # a write's step; None for a read
    approval: Approval = None
    validator: Any = None  # a pydantic model of the arguments

    @property
    def is_write(self) -> bool:
        return self.step is not None

    def needs_approval(self, arguments: dict[str, Any]) -> bool:
        if self.approval is None:
            return False
        if self.approval == "always":
            return True
        assert callable(self.approval)
        return bool(self.approval(arguments))

    def check(self, arguments: Any) -> dict[str, Any]:
        """The arguments as the tool takes them, or a ValueError a model can act on."""
        if not isinstance(arguments, dict):
            raise ValueError(f"the arguments of {self.name!r} must be a JSON object")
        try:
            checked = self.validator.model_validate(arguments)
        except Exception as exc:  # pydantic's ValidationError, worded for the model
            raise ValueError(f"bad arguments for {self.name!r}: {exc}") from None
        return dict(checked.model_dump(mode="json"))

    def schema(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def _validator(name: str, fn: Callable[..., Any]) -> Any:
    """A pydantic model of ``fn``'s parameters after the context."""
    try:
        import pydantic
    except ImportError:  # pragma: no cover - pydantic comes with the agents extra
        raise ConfigurationError(
            "storno.agents needs pydantic: install storno with the [agents] extra"
        ) from None
    params = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
    fields: dict[str, Any] = {}
    for param in params:
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ConfigurationError(f"tool {name!r} cannot take *args or **kwargs")
        annotation = Any if param.annotation is inspect.Parameter.empty else param.annotation
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (annotation, default)
    config = pydantic.ConfigDict(extra="forbid")
    return pydantic.create_model(f"{name}_arguments", __config__=config, **fields)


def _describe(name: str, fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn)
    if not doc:
        raise ConfigurationError(
            f"tool {name!r} has no docstring: the docstring is what the model is told it does"
        )
    return doc


class ToolRegistry:
    """The tools an agent may call, by name."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def _add(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ConfigurationError(f"a tool named {tool.name!r} is registered already")
        self._tools[tool.name] = tool

    def read(self, fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        """Register a read tool (no side effects): ``@tools.read`` or ``@tools.read(name=)``."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            tool_name = name or fn.__name__
            validator = _validator(tool_name, fn)
            self._add(
                Tool(
                    tool_name,
                    _describe(tool_name, fn),
                    validator.model_json_schema(),
                    "read",
                    fn,
                    None,
                    None,
                    validator,
                )
            )
            return fn

        return register(fn) if fn is not None else register

    def write(
        self,
        *,
        kind: StepKind | str,
        compensate: StepFn | None = None,
        verify: StepFn | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        attempt_timeout: float | timedelta | None = None,
        approval: Approval = None,
        name: str | None = None,
    ) -> Callable[[Callable[..., Any]], Step[..., Any]]:
        """Register a write tool: a storno step (``ctx: storno.StepContext`` first) of
        ``kind``; returns the step, so ``@tool.compensation`` and ``@tool.verifier`` work."""
        if approval is not None and approval != "always" and not callable(approval):
            raise ConfigurationError(
                f"approval must be None, 'always' or a predicate on the arguments, got {approval!r}"
            )

        def register(fn: Callable[..., Any]) -> Step[..., Any]:
            tool_name = name or fn.__name__
            made: Step[..., Any] = step(
                kind=kind,
                compensate=compensate,
                verify=verify,
                retry=retry,
                timeout=timeout,
                attempt_timeout=attempt_timeout,
                name=tool_name,
            )(fn)
            validator = _validator(tool_name, fn)
            description = _describe(tool_name, fn)
            schema = validator.model_json_schema()
            tool = Tool(
                tool_name, description, schema, made.kind.value, fn, made, approval, validator
            )
            self._add(tool)
            return made

        return register

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def steps(self) -> list[Step[..., Any]]:
        """The write tools' steps, to register with ``Storno(steps=...)``."""
        return [t.step for t in self._tools.values() if t.step is not None]

    def schemas(self) -> list[dict[str, Any]]:
        """Each tool's name, description and JSON schema of its arguments, for a model."""
        return [t.schema() for t in self._tools.values()]

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)
