"""What a run looks like from outside: its state, its steps and compensations, its history.

Built from the run's record and history by the same fold the engine replays with, so what
``storno show`` draws is what the engine believes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from storno._history import fold
from storno._model import Event, RunRecord, RunStatus
from storno._serde import decode

__all__ = ["CompensationInfo", "HistoryEvent", "RunInfo", "StepInfo", "describe_run"]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _value(text: str | None) -> Any:
    """A stored value for display: decoded when possible, else the raw text."""
    if text is None:
        return None
    try:
        return decode(text)
    except Exception:
        return text


@dataclass(frozen=True, slots=True)
class CompensationInfo:
    """A step's compensation as it stands."""

    status: str
    attempts: int
    idempotency_key: str
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class StepInfo:
    """A forward step as it stands: kind, attempts, key, outcome, compensation."""

    position: int
    name: str
    kind: str
    status: str
    attempts: int
    idempotency_key: str
    outcome_unknown: bool
    verified: list[bool]
    args: Any
    result: Any
    error: dict[str, Any] | None
    started_at: float
    ended_at: float | None
    compensation: CompensationInfo | None
    child_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "attempts": self.attempts,
            "idempotency_key": self.idempotency_key,
            "outcome_unknown": self.outcome_unknown,
            "verified": self.verified,
            "args": self.args,
            "result": self.result,
            "error": self.error,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "child_run_id": self.child_run_id,
            "compensation": None
            if self.compensation is None
            else {
                "status": self.compensation.status,
                "attempts": self.compensation.attempts,
                "idempotency_key": self.compensation.idempotency_key,
                "error": self.compensation.error,
            },
        }


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One history entry for display."""

    seq: int
    type: str
    at: float
    position: int | None
    data: dict[str, Any]
    value: Any

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "type": self.type,
            "at": _iso(self.at),
            "position": self.position,
            "data": self.data,
            "value": self.value,
        }


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run: its state, and (from :meth:`Storno.describe`) its steps and history."""

    run_id: str
    saga: str
    status: RunStatus
    created_at: float
    updated_at: float
    deadline: float | None
    input: Any
    result: Any
    error: dict[str, Any] | None
    owner: str | None
    wake_at: float | None = None
    parent_run_id: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    steps: list[StepInfo] = field(default_factory=list)
    history: list[HistoryEvent] = field(default_factory=list)
    correlation_id: str | None = None  # the choreography it belongs to (None: its own run id)

    def to_json(self, *, with_history: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.run_id,
            "saga": self.saga,
            "status": self.status.value,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "deadline": _iso(self.deadline),
            "input": self.input,
            "result": self.result,
            "error": self.error,
            "owner": self.owner,
            "wake_at": _iso(self.wake_at),
            "parent_run_id": self.parent_run_id,
            "correlation_id": self.correlation_id,
            "state": self.state,
            "steps": [s.to_json() for s in self.steps],
        }
        if with_history:
            out["history"] = [e.to_json() for e in self.history]
        return out


def describe_run(record: RunRecord, events: list[Event] | None = None) -> RunInfo:
    """A :class:`RunInfo` from a record, with steps and history when ``events`` are given."""
    steps: list[StepInfo] = []
    history: list[HistoryEvent] = []
    if events is not None:
        for s in sorted(fold(events).steps.values(), key=lambda s: s.position):
            comp = s.compensation
            steps.append(
                StepInfo(
                    position=s.position,
                    name=s.name,
                    kind=s.kind.value,
                    status="unknown" if s.outcome_unknown and s.status != "completed" else s.status,
                    attempts=s.attempts,
                    idempotency_key=s.key,
                    outcome_unknown=s.outcome_unknown,
                    verified=list(s.verified),
                    args=_value(s.args),
                    result=_value(s.result),
                    error=s.error,
                    started_at=s.started_at,
                    ended_at=s.ended_at,
                    compensation=None
                    if comp is None
                    else CompensationInfo(comp.status, comp.attempts, comp.key, comp.error),
                    child_run_id=s.child_run_id,
                )
            )
        history = [
            HistoryEvent(e.seq, e.type.value, e.at, e.position, e.data, _value(e.payload))
            for e in events
        ]
    return RunInfo(
        run_id=record.run_id,
        saga=record.saga,
        status=record.status,
        created_at=record.created_at,
        updated_at=record.updated_at,
        deadline=record.deadline,
        input=_value(record.input),
        result=_value(record.result),
        error=record.error,
        owner=record.owner,
        wake_at=record.wake_at,
        parent_run_id=record.parent_run_id,
        state=dict(record.state or {}),
        steps=steps,
        history=history,
        correlation_id=record.correlation_id,
    )
