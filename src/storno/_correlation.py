"""What runs' histories say about events, and the runs of one correlation id in order.

A run's history records the events it emitted (``event_emitted``), the event that started it
(the ``cause`` in its ``run_created`` data, for a run a ``storno.on`` handler started) and
the signals events sent it (``signal_received`` with ``sent_by: event`` and a ``cause``).
:class:`Emitted` and :class:`Cause` are those facts as the views show them: the timeline
(:mod:`storno._timeline`) places them in one run, :class:`Correlation` across the runs that
share a correlation id (``storno correlation``, the API and the dashboard's correlation page).
Like the other views it says what happened, never how to word it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from storno._model import ENDED_STATUSES
from storno._views import HistoryEvent, RunInfo, describe_run

if TYPE_CHECKING:
    from storno._app import Storno

__all__ = [
    "Cause",
    "Correlation",
    "CorrelatedRun",
    "Emitted",
    "Entry",
    "EventSignal",
    "build_correlation",
    "cause_of",
    "correlation_of",
    "emitted_of",
    "load_correlation",
]

RUN_SOURCE = "run "
"""How an outbox row names the run that emitted it (``source``: ``run <id>``)."""


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass(frozen=True, slots=True)
class Cause:
    """The event that started a run, or sent it a signal."""

    event_id: str
    topic: str
    source: str | None  # who emitted it: "run <id>" for ctx.emit, else the enqueuer's word
    consumer: str | None  # the storno.on handler that took it
    causation_id: str | None  # the event that caused that one, if any
    emitted_at: float | None

    @property
    def source_run(self) -> str | None:
        """The run that emitted the event, when a run did."""
        if self.source and self.source.startswith(RUN_SOURCE):
            return self.source[len(RUN_SOURCE) :]
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "topic": self.topic,
            "source": self.source,
            "source_run_id": self.source_run,
            "consumer": self.consumer,
            "causation_id": self.causation_id,
            "emitted_at": _iso(self.emitted_at),
        }


def cause_of(data: Mapping[str, Any]) -> Cause | None:
    """The event a history event's data names as its cause, or ``None``."""
    cause = data.get("cause")
    if not isinstance(cause, Mapping) or not cause.get("event_id"):
        return None
    emitted_at = cause.get("emitted_at")
    return Cause(
        event_id=str(cause["event_id"]),
        topic=str(cause.get("topic") or "?"),
        source=None if cause.get("source") is None else str(cause["source"]),
        consumer=None if cause.get("consumer") is None else str(cause["consumer"]),
        causation_id=None if cause.get("causation_id") is None else str(cause["causation_id"]),
        emitted_at=float(emitted_at) if isinstance(emitted_at, int | float) else None,
    )


@dataclass(frozen=True, slots=True)
class Emitted:
    """An event a run emitted (``ctx.emit``) at one of its positions."""

    event_id: str
    topic: str
    key: str | None
    position: int
    at: float
    payload: Any
    causation_id: str | None = None  # the event that started the run, if one did
    headers: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "topic": self.topic,
            "key": self.key,
            "position": self.position,
            "at": _iso(self.at),
            "payload": self.payload,
            "causation_id": self.causation_id,
            "headers": self.headers,
        }


def emitted_of(e: HistoryEvent) -> Emitted | None:
    """The event an ``event_emitted`` history event recorded, or ``None`` for another."""
    if e.type != "event_emitted" or e.position is None:
        return None
    d = e.data
    headers = d.get("headers")
    return Emitted(
        event_id=str(d.get("event_id", "")),
        topic=str(d.get("topic", "?")),
        key=None if d.get("key") is None else str(d["key"]),
        position=e.position,
        at=e.at,
        payload=e.value,
        causation_id=None if d.get("causation_id") is None else str(d["causation_id"]),
        headers=dict(headers) if isinstance(headers, Mapping) else {},
    )


@dataclass(frozen=True, slots=True)
class EventSignal:
    """A signal an event sent a run (a handler's ``storno.events.signal``), as it consumed it."""

    name: str
    at: float
    position: int | None
    cause: Cause

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "at": _iso(self.at),
            "position": self.position,
            "cause": self.cause.to_json(),
        }


@dataclass(frozen=True, slots=True)
class CorrelatedRun:
    """One run of a correlation: the event that started it, what it emitted and consumed."""

    info: RunInfo
    cause: Cause | None
    emitted: list[Emitted]
    signals: list[EventSignal]
    ended_at: float | None  # when it ended, if it has

    def to_json(self) -> dict[str, Any]:
        run = self.info.to_json(with_history=False)
        del run["steps"]
        return {
            "run": run,
            "cause": None if self.cause is None else self.cause.to_json(),
            "emitted": [e.to_json() for e in self.emitted],
            "signals": [s.to_json() for s in self.signals],
            "ended_at": _iso(self.ended_at),
        }


EntryKind = Literal["started", "emitted", "signalled", "ended"]
_LAST = 1 << 30  # where a run's end sorts among what it did at the same moment: after all


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of a correlation's timeline: a run started, emitted, was signalled, ended."""

    at: float
    run_id: str
    saga: str
    kind: EntryKind
    cause: Cause | None = None  # started / signalled: the event (None: not by an event)
    emitted: Emitted | None = None  # emitted
    signal: str | None = None  # signalled: the signal's name
    status: str | None = None  # ended: the run's status
    parent_run_id: str | None = None  # started as a child run of this one
    consumed_by: tuple[str, ...] = ()  # emitted: runs here it started or signalled

    def to_json(self) -> dict[str, Any]:
        return {
            "at": _iso(self.at),
            "run_id": self.run_id,
            "saga": self.saga,
            "kind": self.kind,
            "cause": None if self.cause is None else self.cause.to_json(),
            "emitted": None if self.emitted is None else self.emitted.to_json(),
            "signal": self.signal,
            "status": self.status,
            "parent_run_id": self.parent_run_id,
            "consumed_by": list(self.consumed_by),
        }


@dataclass(frozen=True, slots=True)
class Correlation:
    """The runs sharing a correlation id, oldest first, and one timeline across them."""

    correlation_id: str
    runs: list[CorrelatedRun]
    entries: list[Entry]
    truncated: bool = False  # more runs than were loaded

    def to_json(self) -> dict[str, Any]:
        return {
            "correlation_id": self.correlation_id,
            "runs": [r.to_json() for r in self.runs],
            "entries": [e.to_json() for e in self.entries],
            "truncated": self.truncated,
        }


def _correlated_run(info: RunInfo) -> CorrelatedRun:
    cause: Cause | None = None
    emitted: list[Emitted] = []
    signals: list[EventSignal] = []
    ended_at: float | None = None
    for e in info.history:
        if e.type == "run_created":
            cause = cause_of(e.data)
        elif e.type == "event_emitted":
            found = emitted_of(e)
            if found is not None:
                emitted.append(found)
        elif e.type == "signal_received" and e.data.get("sent_by") == "event":
            sender = cause_of(e.data)
            if sender is not None:
                signals.append(EventSignal(str(e.data.get("name", "")), e.at, e.position, sender))
    if info.status in ENDED_STATUSES:
        ended_at = info.history[-1].at if info.history else info.updated_at
    return CorrelatedRun(info, cause, emitted, signals, ended_at)


def build_correlation(
    correlation_id: str, infos: list[RunInfo], *, truncated: bool = False
) -> Correlation:
    """The correlation of these runs (described with their histories), oldest first."""
    runs = [_correlated_run(info) for info in sorted(infos, key=lambda i: i.created_at)]
    consumers: dict[str, list[str]] = {}
    for run in runs:
        caused = ([run.cause] if run.cause else []) + [s.cause for s in run.signals]
        for c in caused:
            taken = consumers.setdefault(c.event_id, [])
            if run.info.run_id not in taken:
                taken.append(run.info.run_id)
    entries: list[tuple[float, int, int, Entry]] = []
    for order, run in enumerate(runs):
        info = run.info
        rid, saga = info.run_id, info.saga
        start = Entry(
            info.created_at, rid, saga, "started", run.cause, parent_run_id=info.parent_run_id
        )
        entries.append((info.created_at, order, -1, start))
        for em in run.emitted:
            by = tuple(consumers.get(em.event_id, ()))
            entry = Entry(em.at, rid, saga, "emitted", emitted=em, consumed_by=by)
            entries.append((em.at, order, em.position, entry))
        for s in run.signals:
            entry = Entry(s.at, rid, saga, "signalled", s.cause, signal=s.name)
            entries.append((s.at, order, s.position if s.position is not None else 0, entry))
        if run.ended_at is not None:
            end = Entry(run.ended_at, rid, saga, "ended", status=info.status.value)
            entries.append((run.ended_at, order, _LAST, end))
    entries.sort(key=lambda item: item[:3])  # by time; at one moment, by run, then position
    return Correlation(correlation_id, runs, [e for *_, e in entries], truncated)


async def load_correlation(app: Storno, correlation_id: str, *, limit: int = 500) -> Correlation:
    """The runs of one correlation id (at most ``limit``, oldest first) with their histories:
    those carrying the id and the run whose id it is. No run: an empty correlation."""
    await app.open()
    records = await app.store.correlated(correlation_id, limit=limit + 1)
    truncated = len(records) > limit
    records = records[:limit]
    histories = await app.store.histories([r.run_id for r in records])
    infos = [describe_run(r, histories.get(r.run_id, [])) for r in records]
    return build_correlation(correlation_id, infos, truncated=truncated)


def correlation_of(info: RunInfo) -> str | None:
    """The correlation a run's pages link to: its correlation id when it has one, else its
    own run id when it emitted or consumed events; ``None`` for a run outside any."""
    if info.correlation_id:
        return info.correlation_id
    for e in info.history:
        if e.type == "event_emitted" or (e.type in _CAUSED and cause_of(e.data) is not None):
            return info.run_id
    return None


_CAUSED = frozenset({"run_created", "signal_received"})
