"""The claim plan both backends follow: which runs one claim takes, in which batches and order.

A claim leases up to ``limit`` due runs, oldest first, of three kinds: pending runs past any
scheduled start, waiting runs whose wake time has come, and running or compensating runs whose
lease expired (with ``include_own``, also those still leased to the claimer: a worker restarted
under its id resumes its predecessor's runs at once). Runs in ``exclude`` are never taken. A
saga with a concurrency limit is claimed in a batch of its own, after its executing runs are
counted, so that the batch takes only the room left under the limit.

This module holds those decisions once. Each backend renders the branches in its own SQL (its
placeholders, index hints, row locks, the shape of its UPDATE) through a :class:`Dialect`, and
runs a plan's batches in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "EXECUTING",
    "TAKE_OVER",
    "Batch",
    "Branch",
    "ClaimPlan",
    "ClaimRequest",
    "Dialect",
    "Shape",
    "branches",
    "take_over",
    "where",
]


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Who claims, when, and which runs they must not get."""

    owner: str
    now: float
    lease_seconds: float
    include_own: bool = False
    exclude: tuple[str, ...] = ()

    def shape(self, batch: Batch) -> Shape:
        """What the text of the batch's statement depends on."""
        return Shape(
            None if batch.sagas is None else len(batch.sagas),
            len(batch.not_sagas),
            len(self.exclude),
            self.include_own,
        )

    def params(self, batch: Batch) -> dict[str, Any]:
        """The named parameters of a batch's statement (lists stay lists: see :class:`Dialect`)."""
        return {
            "owner": self.owner,
            "now": self.now,
            "expires": self.now + self.lease_seconds,
            "limit": batch.limit,
            "sagas": list(batch.sagas or ()),
            "not_sagas": list(batch.not_sagas),
            "skip": list(self.exclude),
        }


@dataclass(frozen=True, slots=True)
class Batch:
    """One statement of a claim: up to ``limit`` runs of ``sagas`` (any, if ``None``) but
    ``not_sagas``."""

    sagas: tuple[str, ...] | None
    not_sagas: tuple[str, ...]
    limit: int


@dataclass(frozen=True, slots=True)
class Shape:
    """What a batch's statement text depends on: backends build (and cache) one per shape."""

    sagas: int | None  # how many sagas the batch is limited to; None: any
    not_sagas: int
    skip: int  # how many runs are excluded
    include_own: bool


@dataclass(frozen=True, slots=True)
class ClaimPlan:
    """The batches of one claim: the freely claimed sagas first, then each capped one."""

    limit: int
    free: tuple[str, ...] | None  # None: any saga but the capped ones
    capped: tuple[tuple[str, int], ...]  # (saga, limit), in name order

    @classmethod
    def of(
        cls, limit: int, sagas: Sequence[str] | None, limits: Mapping[str, int] | None
    ) -> ClaimPlan | None:
        """The plan for a claim, or ``None`` if it can take nothing (no room, no sagas)."""
        if limit <= 0 or (sagas is not None and not sagas):
            return None
        capped = {n: c for n, c in (limits or {}).items() if sagas is None or n in sagas}
        free = tuple(n for n in sagas if n not in capped) if sagas is not None else None
        return cls(limit, free, tuple(sorted(capped.items())))

    def free_batch(self) -> Batch | None:
        """The batch of the sagas without a limit, if there are any to claim."""
        if self.free is not None and not self.free:
            return None
        return Batch(self.free, tuple(name for name, _ in self.capped), self.limit)

    def capped_batch(self, saga: str, cap: int, executing: int, claimed: int) -> Batch | None:
        """The batch of a capped saga with ``executing`` runs under a live lease, after
        ``claimed`` runs taken by this claim so far; ``None`` if there is no room.

        The backend counts ``executing`` so that no other claimer counts or claims the saga
        until its transaction ends (SQLite: its one writer; PostgreSQL: an advisory lock).
        """
        room = min(cap - executing, self.limit - claimed)
        return Batch((saga,), (), room) if room > 0 else None


@dataclass(frozen=True, slots=True)
class Branch:
    """One kind of due run, read through its own status index so that a claim touches due
    runs only, never the finished ones beside them."""

    name: str
    where: str  # with {now} and {owner} where the dialect's placeholders go
    order: str | None  # the branch's order, oldest due first; None: any (all are overdue)
    index: str  # the index the branch is meant to walk


def branches(include_own: bool) -> tuple[Branch, Branch, Branch]:
    """The three kinds of due run, in the order their rows are unioned."""
    # Without include_own the expiry condition is a plain range: the index walk stops at the
    # first unexpired lease.
    expired = "lease_expires_at < {now}"
    if include_own:
        expired = f"({expired} OR owner = {{owner}})"
    return (
        Branch(
            "pending",
            "status = 'pending' AND (wake_at IS NULL OR wake_at <= {now})",
            "created_at",
            "storno_runs_by_status_created",
        ),
        Branch(
            "woken", "status = 'waiting' AND wake_at <= {now}", "wake_at", "storno_runs_by_wake"
        ),
        Branch(
            "expired",
            f"status IN ('running', 'compensating') AND {expired}",
            None,
            "storno_runs_by_status",
        ),
    )


TAKE_OVER = (
    "owner = {owner}, epoch = epoch + 1, lease_expires_at = {expires}, updated_at = {now}, "
    "wake_at = NULL, status = CASE WHEN status IN ('pending', 'waiting') THEN 'running' "
    "ELSE status END"
)
"""The SET clause of a claim: a new lease (a higher epoch fences the old holder's writes), and
a pending or waiting run becomes running (a compensating one stays so)."""


EXECUTING = "status IN ('running', 'compensating') AND lease_expires_at >= {now}"
"""The runs that count against a saga's limit: held by a live worker right now."""


class Dialect(Protocol):
    """How a backend writes the parameters of a claim's branches."""

    def mark(self, name: str) -> str:
        """The placeholder of the scalar parameter ``name``."""
        ...

    def among(self, column: str, name: str, count: int, *, negate: bool) -> str:
        """``column`` is (``negate``: is not) one of the ``count`` values of the list
        parameter ``name``."""
        ...


def where(branch: Branch, shape: Shape, dialect: Dialect) -> str:
    """A branch's whole condition: its kind of due run, the batch's sagas, the excluded runs."""
    clauses = [branch.where.format(now=dialect.mark("now"), owner=dialect.mark("owner"))]
    if shape.sagas is not None:
        clauses.append(dialect.among("saga", "sagas", shape.sagas, negate=False))
    if shape.not_sagas:
        clauses.append(dialect.among("saga", "not_sagas", shape.not_sagas, negate=True))
    if shape.skip:
        clauses.append(dialect.among("run_id", "skip", shape.skip, negate=True))
    return " AND ".join(clauses)


def take_over(dialect: Dialect) -> str:
    """:data:`TAKE_OVER` with the dialect's placeholders."""
    return TAKE_OVER.format(**{n: dialect.mark(n) for n in ("owner", "expires", "now")})
