"""Named points in the engine where a test can inject a fault (a crash, an error).

The engine calls :func:`point` at every place where a process could die with interesting
consequences: after a step's durable start, after the step's call returned but before its
result is recorded, the same around each compensation, and before a run's end is recorded.
With no hook set this costs one global read. An ``Exception`` raised by the hook at any
``step.*`` or ``compensation.*`` point counts as that attempt's own failure (at ``*.returned``
a ``TimeoutError`` stands for a call that landed and lost its answer); a ``BaseException``
escapes the engine as a dying process would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["POINTS", "point", "set_hook"]

POINTS = (
    "step.started",  # the attempt is durably recorded; the call has not been made
    "step.returned",  # the call returned; its result is not recorded yet
    "compensation.started",
    "compensation.returned",
    "run.ending",  # the run's end (completed, compensated) is about to be recorded
    "relay.claimed",  # a relay's claim of outbox rows committed; nothing is sent yet
    "relay.confirmed",  # the broker confirmed a wave; the rows are not marked sent yet
)

Hook = Callable[[str, dict[str, Any]], None]
_hook: Hook | None = None


def set_hook(hook: Hook | None) -> Hook | None:
    """Install a hook called at every fault point; return the previous one."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def point(name: str, **details: Any) -> None:
    if _hook is not None:
        _hook(name, details)
