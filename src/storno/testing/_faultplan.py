"""What can go wrong at a fake provider, as data: faults, outages and worker crashes.

A :class:`Schedule` is one run's bad day. Faults count the run's own requests to the
provider, so a schedule does the same thing however many other runs share the provider, and
a schedule drawn from a seed (:func:`random_schedule`) can be replayed exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Crash", "Fault", "FaultKind", "Outage", "RequestKind", "Schedule", "random_schedule"]

FaultKind = Literal["error", "throttle", "drop", "late", "decline"]
RequestKind = Literal["call", "undo", "lookup"]

_BEFORE_KEY_CHECK = ("error", "throttle")


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault at the provider, on the ``nth`` to ``nth + times - 1`` requests of a run
    that match ``on`` (call, undo or lookup) and ``op`` (``None``: any operation).

    - ``error``: a 500 before the key check (the provider never looked at the key);
    - ``throttle``: a 429 before the key check, with ``retry_after`` seconds;
    - ``drop``: the request is handled (the write lands), then the answer is lost;
    - ``late``: the answer is lost at once and the write lands ``lands_after`` requests of the
      run later; until then the key is "in progress" (a 409 to a retry, a read-back or an
      undo under it), as real providers answer concurrent requests under one key;
    - ``decline``: a first call is refused for good (a card declined), recorded under the key
      so that a repeat of the key is declined again.
    """

    kind: FaultKind
    op: str | None = None
    on: RequestKind = "call"
    nth: int = 1
    times: int = 1
    retry_after: float = 2.0
    lands_after: int = 2

    def __post_init__(self) -> None:
        if self.nth < 1 or self.times < 1 or self.lands_after < 1:
            raise ValueError(f"nth, times and lands_after count from 1: {self!r}")
        if self.kind in ("late", "decline") and self.on != "call":
            raise ValueError(f"a {self.kind!r} fault applies to calls, not to {self.on}s")

    @property
    def before_key_check(self) -> bool:
        return self.kind in _BEFORE_KEY_CHECK

    def matches(self, on: RequestKind, op: str) -> bool:
        return self.on == on and (self.op is None or self.op == op)

    def describe(self) -> str:
        what = {
            "error": "500",
            "throttle": f"429 (retry after {self.retry_after:g}s)",
            "drop": "answer lost after the write",
            "late": f"answer lost, write lands after {self.lands_after} more request(s)",
            "decline": "declined",
        }[self.kind]
        which = f"{self.op or 'any'} {self.on} #{self.nth}"
        if self.times > 1:
            which += f"-#{self.nth + self.times - 1}"
        return f"{what} on {which}"


@dataclass(frozen=True, slots=True)
class Outage:
    """Every request of the run, numbers ``start`` to ``start + length - 1`` (from 1), fails
    with a 503 before the key check."""

    start: int
    length: int

    def __post_init__(self) -> None:
        if self.start < 1 or self.length < 1:
            raise ValueError(f"an outage starts at request 1 or later and lasts 1 or more: {self}")

    def covers(self, request: int) -> bool:
        return self.start <= request < self.start + self.length

    def describe(self) -> str:
        return f"outage over requests #{self.start}-#{self.start + self.length - 1}"


@dataclass(frozen=True, slots=True)
class Crash:
    """The worker dies in a step (a :meth:`storno.testing.FaultInjector.crash`): before an
    attempt's call, or after the call returned and before its result was recorded; the
    ``attempt``-th time the step reaches that point in the run."""

    step: str
    when: Literal["before_call", "after_call"] = "after_call"
    attempt: int = 1

    def describe(self) -> str:
        return f"worker dies {self.when.replace('_', ' ')} of {self.step} attempt {self.attempt}"


@dataclass(frozen=True, slots=True)
class Schedule:
    """One run's faults at the provider and crashes of its worker."""

    faults: tuple[Fault, ...] = ()
    outages: tuple[Outage, ...] = ()
    crashes: tuple[Crash, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.faults or self.outages or self.crashes)

    @property
    def loses_answers(self) -> bool:
        """Whether an answer is lost (a dropped or late answer, a worker dying mid-call)."""
        return bool(self.crashes) or any(f.kind in ("drop", "late") for f in self.faults)

    def describe(self) -> str:
        parts = [f.describe() for f in self.faults]
        parts += [o.describe() for o in self.outages]
        parts += [c.describe() for c in self.crashes]
        return "; ".join(parts) or "no faults"


def random_schedule(
    rng: random.Random,
    operations: Sequence[tuple[str, str]],
    steps: Sequence[str] = (),
    *,
    crash_rate: float = 0.1,
    lost_answers: bool = True,
) -> Schedule:
    """Draw a schedule for a run that calls ``operations`` (name, kind) in steps ``steps``.

    Up to four faults, each on one of the first few requests of its kind; an outage now and
    then; a worker crash with probability ``crash_rate``. ``lost_answers=False`` draws only
    faults that leave no answer lost (no drop, late or crash). Declines hit only compensable
    operations and the pivot: elsewhere a refusal for good parks the run by design.
    """
    ops = [name for name, _ in operations]
    undoable = [n for n, kind in operations if kind == "compensable"]
    declinable = [n for n, kind in operations if kind in ("compensable", "pivot")]
    kinds: list[FaultKind] = ["error", "error", "throttle"]
    if lost_answers:
        kinds += ["drop", "drop", "late"]
    faults: list[Fault] = []
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 4))):
        kind = rng.choice(kinds)
        if kind in ("error", "throttle"):
            on: RequestKind = rng.choice(("call", "call", "call", "undo", "lookup"))
            times = rng.choice((1, 1, 2, 3, 4))
        else:
            on = "call" if kind == "late" else rng.choice(("call", "call", "undo"))
            times = 1
        if on == "undo" and not undoable:
            on = "call"
        choices = undoable if on == "undo" else ops
        op = rng.choice(choices) if choices else None
        faults.append(
            Fault(
                kind,
                op,
                on,
                nth=rng.choice((1, 1, 1, 2, 3)),
                times=times,
                retry_after=rng.choice((0.5, 2.0, 30.0)),
                lands_after=rng.choice((1, 2, 3)),
            )
        )
    if declinable and rng.random() < 0.08:
        faults.append(Fault("decline", rng.choice(declinable)))
    outages = (Outage(rng.randint(1, 8), rng.randint(1, 6)),) if rng.random() < 0.2 else ()
    crashes: tuple[Crash, ...] = ()
    if lost_answers and steps and rng.random() < crash_rate:
        crashes = (
            Crash(
                rng.choice(list(steps)),
                rng.choice(("before_call", "after_call")),
                rng.choice((1, 1, 2)),
            ),
        )
    return Schedule(tuple(faults), outages, crashes)
