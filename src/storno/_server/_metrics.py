"""Prometheus metrics: counts from the store at scrape time, latencies from run events.

Gauges (``storno_runs``, ``storno_dead_letters``, ``storno_stuck_runs``, ``storno_outbox_*``)
are read from the store when ``/metrics`` is scraped, so they cover every process sharing the
database.
Histograms and counters come from :class:`EventMetrics`, a listener that sees the runs this
process executes (run the server with ``--worker``, or add the listener in your workers).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from storno._model import Event, EventType, RunRecord
from storno._server._stats import Snapshot

__all__ = ["EventMetrics", "Metrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
_RUN = (0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600, 6 * 3600, 86400, 7 * 86400)
_ENDS = {
    EventType.RUN_COMPLETED: "completed",
    EventType.RUN_COMPENSATED: "compensated",
    EventType.RUN_COMPENSATION_FAILED: "compensation_failed",
    EventType.RUN_NEEDS_ATTENTION: "needs_attention",
    EventType.RUN_CANCELLED: "cancelled",
}


class EventMetrics:
    """A listener that turns run events into latency histograms and counters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.step_seconds = Histogram(
            "storno_step_duration_seconds",
            "Duration of step attempts, from step_started to its outcome.",
            ["saga", "step", "outcome"],
            buckets=_LATENCY,
            registry=r,
        )
        self.compensation_seconds = Histogram(
            "storno_compensation_duration_seconds",
            "Duration of compensation attempts.",
            ["saga", "step", "outcome"],
            buckets=_LATENCY,
            registry=r,
        )
        self.run_seconds = Histogram(
            "storno_run_duration_seconds",
            "Time from a run's creation to its end (including waits).",
            ["saga", "status"],
            buckets=_RUN,
            registry=r,
        )
        self.retries = Counter(
            "storno_step_retries",
            "Step attempts after the first (retries).",
            ["saga", "step"],
            registry=r,
        )
        self.attempt_failures = Counter(
            "storno_step_attempt_failures",
            "Failed step attempts, by error type.",
            ["saga", "step", "error_type"],
            registry=r,
        )
        self.unknown = Counter(
            "storno_unknown_outcomes",
            "Step attempts whose outcome was unknown (lost answer, timeout, crash).",
            ["saga", "step"],
            registry=r,
        )
        self.readbacks = Counter(
            "storno_readbacks",
            "Read-backs (verify) of unknown outcomes, by whether the call had landed.",
            ["saga", "step", "landed"],
            registry=r,
        )
        self.compensation_retries = Counter(
            "storno_compensation_retries",
            "Compensation attempts after the first.",
            ["saga", "step"],
            registry=r,
        )
        self.compensation_failures = Counter(
            "storno_compensation_failures",
            "Compensations that gave up (the run became a dead letter).",
            ["saga", "step"],
            registry=r,
        )
        self.runs_ended = Counter(
            "storno_runs_ended",
            "Runs that ended (or were parked) in this process, by final status.",
            ["saga", "status"],
            registry=r,
        )
        self.signals = Counter(
            "storno_signals_received",
            "Signals consumed by runs.",
            ["saga", "signal"],
            registry=r,
        )
        self.emitted = Counter(
            "storno_events_emitted",
            "Events runs emitted (ctx.emit), committed to the outbox with the run.",
            ["topic"],
            registry=r,
        )
        self._started: dict[tuple[str, int, str], float] = {}
        self._names: dict[tuple[str, int], str] = {}

    def __call__(self, record: RunRecord, events: list[Event]) -> None:
        saga, run_id = record.saga, record.run_id
        for event in events:
            self._one(saga, run_id, record, event)

    def _step(self, run_id: str, event: Event) -> str:
        position = event.position if event.position is not None else -1
        named = event.data.get("step")
        if named:
            self._names[(run_id, position)] = str(named)
            return str(named)
        return self._names.get((run_id, position), "?")

    def _one(self, saga: str, run_id: str, record: RunRecord, event: Event) -> None:
        t, d, p = event.type, event.data, event.position
        if t is EventType.STEP_STARTED and p is not None:
            step = self._step(run_id, event)
            self._started[(run_id, p, "step")] = event.at
            if int(d.get("attempt", 1)) > 1:
                self.retries.labels(saga, step).inc()
        elif t in (EventType.STEP_COMPLETED, EventType.ATTEMPT_FAILED) and p is not None:
            step = self._step(run_id, event)
            unknown = bool(d.get("outcome_unknown"))
            outcome = "completed" if t is EventType.STEP_COMPLETED else "failed"
            if unknown:
                outcome = "unknown"
                self.unknown.labels(saga, step).inc()
            if t is EventType.ATTEMPT_FAILED:
                error = d.get("error") or {}
                self.attempt_failures.labels(saga, step, str(error.get("type", "?"))).inc()
            began = self._started.pop((run_id, p, "step"), None)
            if began is not None:
                self.step_seconds.labels(saga, step, outcome).observe(max(event.at - began, 0))
        elif t is EventType.OUTCOME_UNKNOWN and p is not None:
            if d.get("reason") != "read-back failed":
                self.unknown.labels(saga, self._step(run_id, event)).inc()
        elif t is EventType.VERIFIED and p is not None:
            landed = "yes" if d.get("applied") else "no"
            self.readbacks.labels(saga, self._step(run_id, event), landed).inc()
        elif t is EventType.COMPENSATION_STEP_STARTED and p is not None:
            step = self._step(run_id, event)
            self._started[(run_id, p, "comp")] = event.at
            if int(d.get("attempt", 1)) > 1:
                self.compensation_retries.labels(saga, step).inc()
        elif (
            t in (EventType.COMPENSATION_STEP_COMPLETED, EventType.COMPENSATION_ATTEMPT_FAILED)
            and p is not None
        ):
            step = self._step(run_id, event)
            outcome = "completed" if t is EventType.COMPENSATION_STEP_COMPLETED else "failed"
            began = self._started.pop((run_id, p, "comp"), None)
            if began is not None:
                self.compensation_seconds.labels(saga, step, outcome).observe(
                    max(event.at - began, 0)
                )
        elif t is EventType.COMPENSATION_STEP_FAILED and p is not None:
            self.compensation_failures.labels(saga, self._step(run_id, event)).inc()
        elif t is EventType.SIGNAL_RECEIVED:
            self.signals.labels(saga, str(d.get("name", "?"))).inc()
        elif t is EventType.EVENT_EMITTED:
            self.emitted.labels(str(d.get("topic", "?"))).inc()
        elif t in _ENDS:
            status = _ENDS[t]
            self.runs_ended.labels(saga, status).inc()
            self.run_seconds.labels(saga, status).observe(max(event.at - record.created_at, 0))
            self._forget(run_id)
        elif t is EventType.RUN_WAITING:
            self._forget(run_id)

    def _forget(self, run_id: str) -> None:
        for key in [k for k in self._started if k[0] == run_id]:
            del self._started[key]
        for name in [k for k in self._names if k[0] == run_id]:
            del self._names[name]


class Metrics:
    """The server's registry: event metrics plus gauges filled from a store snapshot."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.events = EventMetrics(self.registry)
        self.runs = Gauge(
            "storno_runs",
            "Runs in the store, by saga and status.",
            ["saga", "status"],
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "storno_dead_letters",
            "Runs in compensation_failed (dead letters) waiting for an operator.",
            registry=self.registry,
        )
        self.stuck = Gauge(
            "storno_stuck_runs",
            "Runs not ended and without progress for longer than their saga's threshold.",
            ["saga"],
            registry=self.registry,
        )
        self.oldest_stuck = Gauge(
            "storno_stuck_oldest_seconds",
            "Seconds since the least recently changed stuck run last changed (0: none).",
            registry=self.registry,
        )
        self.outbox_pending = Gauge(
            "storno_outbox_pending",
            "Events committed to the outbox and not sent yet (dead letters not included).",
            registry=self.registry,
        )
        self.outbox_dead = Gauge(
            "storno_outbox_dead",
            "Outbox dead letters: events the broker kept refusing, each blocking its key.",
            registry=self.registry,
        )
        self.outbox_lag = Gauge(
            "storno_outbox_lag_seconds",
            "Seconds the oldest unsent outbox event has waited (0: none waits).",
            registry=self.registry,
        )

    def render(self, snap: Snapshot) -> bytes:
        self.runs.clear()
        for (saga, status), count in snap.by_saga_status.items():
            self.runs.labels(saga, status).set(count)
        self.dead_letters.set(snap.dead_letters)
        self.stuck.clear()
        for saga, count in snap.stuck_by_saga().items():
            self.stuck.labels(saga).set(count)
        oldest: Any = min((s.run.updated_at for s in snap.stuck), default=None)
        self.oldest_stuck.set(0 if oldest is None else max(snap.taken_at - oldest, 0))
        self.outbox_pending.set(snap.outbox.pending)
        self.outbox_dead.set(snap.outbox.dead)
        self.outbox_lag.set(snap.outbox.lag(snap.taken_at))
        return generate_latest(self.registry)
