"""Sagas as data: a plan is a list of calls to registered steps, as an agent would propose it.

A plan is checked before anything runs: every step must exist, every call must fit the step's
signature, and the order must be ``compensable* pivot? (retryable | noncompensable)*``. A
valid plan runs on the same engine as a code-first saga, as the built-in saga ``storno.plan``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from storno._context import SagaContext
from storno._definitions import Step
from storno._errors import ConfigurationError, PlanError
from storno._model import StepKind
from storno._saga import Saga

__all__ = ["PLAN_SAGA_NAME", "Plan", "PlanStep", "parse_plan", "plan_saga", "validate_plan"]


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One call in a plan: a registered step's name and its arguments."""

    step: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    """A saga as data. JSON form: ``{"steps": [{"step": "name", "args": [], "kwargs": {}}]}``."""

    steps: list[PlanStep]

    def to_json(self) -> dict[str, Any]:
        return {"steps": [{"step": s.step, "args": s.args, "kwargs": s.kwargs} for s in self.steps]}


def parse_plan(data: Plan | Mapping[str, Any] | Sequence[Any] | str) -> Plan:
    """A :class:`Plan` from its JSON text, its parsed JSON, or a list of calls."""
    if isinstance(data, Plan):
        return data
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise PlanError(f"the plan is not valid JSON: {exc}") from None
    if isinstance(data, Mapping):
        if "steps" not in data:
            raise PlanError('a plan is an object with a "steps" list')
        calls = data["steps"]
    else:
        calls = data
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise PlanError('a plan\'s "steps" must be a list of calls')
    steps, problems = [], []
    for number, call in enumerate(calls, 1):
        if isinstance(call, PlanStep):
            steps.append(call)
            continue
        if not isinstance(call, Mapping) or not isinstance(call.get("step"), str):
            problems.append(f'#{number}: a call is an object with a "step" name, got {call!r}')
            continue
        args, kwargs = call.get("args", []), call.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, Mapping):
            problems.append(
                f'#{number} {call["step"]!r}: "args" must be a list, "kwargs" an object'
            )
            continue
        extra = set(call) - {"step", "args", "kwargs"}
        if extra:
            problems.append(f"#{number} {call['step']!r}: unknown field(s) {sorted(extra)}")
            continue
        steps.append(PlanStep(call["step"], list(args), dict(kwargs)))
    if problems:
        raise PlanError("the plan is malformed: " + "; ".join(problems), problems)
    if not steps:
        raise PlanError("the plan has no steps")
    return Plan(steps)


StepLookup = (
    Callable[[str], Step[..., Any] | None] | Mapping[str, Step[..., Any]] | Iterable[Step[..., Any]]
)
"""Where a plan's step names are looked up: a function, a mapping, or the steps themselves."""


def validate_plan(
    plan: Plan | Mapping[str, Any] | Sequence[Any] | str, lookup: StepLookup
) -> list[Step[..., Any]]:
    """The plan's steps, or a :class:`PlanError` that lists every problem found.

    ``plan`` may be a :class:`Plan`, its JSON (text or parsed), or the plain list of calls an
    agent sends; ``lookup`` a function from a name to a step, a mapping, or the steps."""
    plan = parse_plan(plan)
    if isinstance(lookup, Mapping):
        lookup = lookup.get
    elif not callable(lookup):
        by_name = {step.name: step for step in lookup}
        lookup = by_name.get
    problems: list[str] = []
    found: list[tuple[int, str, Step[..., Any]]] = []
    for number, call in enumerate(plan.steps, 1):
        step = lookup(call.step)
        if step is None:
            problems.append(f"#{number} {call.step!r} is not a registered step")
            continue
        try:
            step.check_runnable()
            step.check_arguments(call.args, call.kwargs)
        except ConfigurationError as exc:
            problems.append(f"#{number} {call.step!r}: {exc}")
        except TypeError as exc:
            problems.append(f"#{number} {call.step!r} does not accept these arguments: {exc}")
        found.append((number, call.step, step))
    problems.extend(_order_problems(found))
    if problems:
        raise PlanError("the plan was refused, nothing ran: " + "; ".join(problems), problems)
    return [step for _, _, step in found]


def _order_problems(steps: list[tuple[int, str, Step[..., Any]]]) -> list[str]:
    """Check ``compensable* pivot? (retryable | noncompensable)*``."""
    problems: list[str] = []
    pivot: tuple[int, str] | None = None
    forward_only: tuple[int, str, StepKind] | None = None  # first step that cannot be undone
    for number, name, step in steps:
        kind = step.kind
        if kind is StepKind.COMPENSABLE:
            if forward_only is not None:
                n, other, other_kind = forward_only
                problems.append(
                    f"#{number} {name!r} is compensable but stands after #{n} {other!r} "
                    f"({other_kind.value}), which cannot be undone: every compensable step "
                    f"must come before the pivot"
                )
        elif kind is StepKind.PIVOT:
            if pivot is not None:
                problems.append(
                    f"#{number} {name!r} is a second pivot (the first is #{pivot[0]} "
                    f"{pivot[1]!r}): a plan has at most one point of no return"
                )
            elif forward_only is not None:
                n, other, other_kind = forward_only
                problems.append(
                    f"#{number} {name!r} is the pivot but stands after #{n} {other!r} "
                    f"({other_kind.value}), which already cannot be undone: the pivot must "
                    f"come before every retryable and noncompensable step"
                )
            pivot = pivot or (number, name)
        if kind is not StepKind.COMPENSABLE and forward_only is None:
            forward_only = (number, name, kind)
    return problems


PLAN_SAGA_NAME = "storno.plan"


def plan_saga(find_step: Callable[[str], Step[..., Any] | None]) -> Saga[..., list[Any]]:
    """The saga that runs plans, looking their steps up with ``find_step`` (an application's
    registry): the plan is checked again when it runs, as the registry may have changed."""

    async def run_plan(ctx: SagaContext, plan: dict[str, Any]) -> list[Any]:
        parsed = parse_plan(plan)
        steps = validate_plan(parsed, find_step)
        return [
            await ctx.step(step, *call.args, **call.kwargs)
            for step, call in zip(steps, parsed.steps, strict=True)
        ]

    return Saga(run_plan, name=PLAN_SAGA_NAME, timeout=None)
