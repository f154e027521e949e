"""OpenTelemetry tracing built from run events (the ``storno[otel]`` extra).

Every run is one trace whose id is derived from the run's id (a child run shares its root
run's trace), so spans written by different processes, before and after a crash, land in the
same trace without anything stored. Span ids are derived too: the run's span from the run id,
each attempt's span from (run id, step or compensation, position, attempt). That is what lets
step code send the trace context along before the span exists: :func:`trace_headers` computes
the ``traceparent`` header of the attempt it runs in, and the attempt's span is written with
that very id when the attempt's outcome is durable.

Spans are written after the fact, with the recorded start and end times: a span per run (when
it ends), per step attempt, per compensation attempt, per read-back, per durable sleep and
signal wait. Each carries ``storno.run_id`` as its correlation id.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from storno._definitions import CompensationContext, StepContext
from storno._model import Event, EventType, RunRecord
from storno._traceids import span_id, trace_id

__all__ = ["Tracing", "span_id", "trace_headers", "trace_id"]

log = logging.getLogger("storno.tracing")
_chosen: ContextVar[tuple[int, int] | None] = ContextVar("storno_chosen_ids", default=None)

_ENDS = {
    EventType.RUN_COMPLETED: "completed",
    EventType.RUN_COMPENSATED: "compensated",
    EventType.RUN_COMPENSATION_FAILED: "compensation_failed",
    EventType.RUN_NEEDS_ATTENTION: "needs_attention",
    EventType.RUN_CANCELLED: "cancelled",
}


def trace_headers(ctx: StepContext | CompensationContext[Any]) -> dict[str, str]:
    """W3C ``traceparent`` for the attempt a step or compensation runs in.

    Send it with the step's outgoing calls (``httpx.post(url, headers=trace_headers(ctx))``):
    the other service's spans become children of this attempt's span.
    """
    what = "compensation" if isinstance(ctx, CompensationContext) else "step"
    sid = span_id(ctx.run_id, what, ctx.position, ctx.attempt)
    return {"traceparent": f"00-{trace_id(ctx.run_id):032x}-{sid:016x}-01"}


class _ChosenIds:
    """Wraps a tracer's id generator: ids set in :data:`_chosen` win, else the inner ones."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def generate_span_id(self) -> int:
        chosen = _chosen.get()
        return chosen[1] if chosen else int(self.inner.generate_span_id())

    def generate_trace_id(self) -> int:
        chosen = _chosen.get()
        return chosen[0] if chosen else int(self.inner.generate_trace_id())

    def is_trace_id_random(self) -> bool:
        if _chosen.get() is not None:
            return False
        check = getattr(self.inner, "is_trace_id_random", None)
        return bool(check()) if check else True


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Tracing:
    """A listener that writes OpenTelemetry spans for the runs this process executes.

    ``tracer_provider`` defaults to the global one (``opentelemetry.trace``). With the SDK's
    provider, spans get the derived ids described above; with another provider they keep
    its ids but still join the run's trace.
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        from opentelemetry import trace

        self._trace = trace
        self.provider = tracer_provider
        self._open: dict[tuple[str, str, int], tuple[float, dict[str, Any]]] = {}
        self._names: dict[tuple[str, int], str] = {}

    def _tracer(self) -> Any:
        provider = self.provider or self._trace.get_tracer_provider()
        tracer: Any = provider.get_tracer("storno")
        inner = getattr(tracer, "id_generator", None)
        if inner is not None and not isinstance(inner, _ChosenIds):
            tracer.id_generator = _ChosenIds(inner)
        return tracer

    def _parent(self, run_id: str, parent_span: int | None) -> Any:
        from opentelemetry.context import Context

        if parent_span is None:
            return Context()
        trace = self._trace
        context = trace.SpanContext(
            trace_id(run_id),
            parent_span,
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(context), Context())

    def emit(
        self,
        name: str,
        run_id: str,
        sid: int,
        parent_span: int | None,
        start: float,
        end: float,
        attributes: dict[str, Any],
        error: str | None = None,
    ) -> None:
        from opentelemetry.trace import Status, StatusCode

        attrs = {k: v for k, v in attributes.items() if v is not None}
        attrs["storno.run_id"] = run_id
        token = _chosen.set((trace_id(run_id), sid))
        try:
            span = self._tracer().start_span(
                name,
                context=self._parent(run_id, parent_span),
                attributes=attrs,
                start_time=_ns(start),
            )
        finally:
            _chosen.reset(token)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error[:500]))
        span.end(end_time=_ns(max(end, start)))

    def __call__(self, record: RunRecord, events: list[Event]) -> None:
        for event in events:
            self._one(record, event)

    def _run_parent(self, run_id: str) -> int | None:
        """A child run's span hangs under its parent's call; a root run has no parent."""
        parent, sep, position = run_id.rpartition("/")
        if not sep or not position.isdigit():
            return None
        return span_id(parent, "step", int(position), 1)

    def _one(self, record: RunRecord, event: Event) -> None:
        run_id, t, d, p = record.run_id, event.type, event.data, event.position
        base = {"storno.saga": record.saga}
        run_span = span_id(run_id)
        if t in (EventType.STEP_STARTED, EventType.CHILD_STARTED) and p is not None:
            name = str(d.get("step") or d.get("saga"))
            self._names[(run_id, p)] = name
            attempt = int(d.get("attempt", 1))
            self._open[(run_id, "step", p)] = (
                event.at,
                {
                    **base,
                    "storno.step": name,
                    "storno.position": p,
                    "storno.attempt": attempt,
                    "storno.step_kind": d.get("kind"),
                    "storno.idempotency_key": d.get("key") or d.get("child"),
                },
            )
        elif (
            t in (EventType.STEP_COMPLETED, EventType.ATTEMPT_FAILED, EventType.CHILD_ENDED)
            and p is not None
        ):
            opened = self._open.pop((run_id, "step", p), None)
            if opened is None:
                return
            start, attrs = opened
            error = d.get("error") if t is not EventType.STEP_COMPLETED else None
            if t is EventType.CHILD_ENDED and d.get("status") == "completed":
                error = None
            attrs["storno.outcome_unknown"] = bool(d.get("outcome_unknown"))
            message = None
            if error is not None:
                message = error.get("message") if isinstance(error, dict) else str(error)
                message = message or "failed"
            sid = span_id(run_id, "step", p, int(attrs["storno.attempt"]))
            name = f"step {attrs['storno.step']}"
            self.emit(name, run_id, sid, run_span, start, event.at, attrs, message)
        elif t is EventType.VERIFIED and p is not None:
            step = self._names.get((run_id, p), "?")
            attrs = {**base, "storno.step": step, "storno.landed": bool(d.get("applied"))}
            sid = span_id(run_id, "verify", p, int(d.get("attempt", 0)))
            self.emit(f"read-back {step}", run_id, sid, run_span, event.at, event.at, attrs)
        elif t is EventType.COMPENSATION_STEP_STARTED and p is not None:
            name = str(d.get("step") or self._names.get((run_id, p), "?"))
            self._names[(run_id, p)] = name
            attrs = {
                **base,
                "storno.step": name,
                "storno.position": p,
                "storno.attempt": int(d.get("attempt", 1)),
                "storno.idempotency_key": d.get("key"),
            }
            self._open[(run_id, "compensation", p)] = (event.at, attrs)
        elif (
            t in (EventType.COMPENSATION_STEP_COMPLETED, EventType.COMPENSATION_ATTEMPT_FAILED)
            and p is not None
        ):
            opened = self._open.pop((run_id, "compensation", p), None)
            if opened is None:
                return
            start, attrs = opened
            message = None
            if t is EventType.COMPENSATION_ATTEMPT_FAILED:
                message = str((d.get("error") or {}).get("message") or "failed")
            sid = span_id(run_id, "compensation", p, int(attrs["storno.attempt"]))
            name = f"compensate {attrs['storno.step']}"
            self.emit(name, run_id, sid, run_span, start, event.at, attrs, message)
        elif t in (EventType.TIMER_STARTED, EventType.SIGNAL_WAIT_STARTED) and p is not None:
            what = "sleep" if t is EventType.TIMER_STARTED else f"wait for signal {d.get('name')}"
            self._open[(run_id, "wait", p)] = (event.at, {**base, "storno.wait": what})
        elif (
            t in (EventType.TIMER_FIRED, EventType.SIGNAL_RECEIVED, EventType.SIGNAL_TIMED_OUT)
            and p is not None
        ):
            opened = self._open.pop((run_id, "wait", p), None)
            if opened is None:
                return
            start, attrs = opened
            attrs["storno.timed_out"] = t is EventType.SIGNAL_TIMED_OUT
            sid = span_id(run_id, "wait", p)
            self.emit(str(attrs["storno.wait"]), run_id, sid, run_span, start, event.at, attrs)
        elif t in _ENDS:
            status = _ENDS[t]
            error = record.error or d.get("error")
            message = None
            if status != "completed":
                message = str((error or {}).get("message") or status)
            attrs = {**base, "storno.status": status, "storno.parent_run_id": record.parent_run_id}
            self.emit(
                f"run {record.saga}",
                run_id,
                run_span,
                self._run_parent(run_id),
                record.created_at,
                event.at,
                attrs,
                message,
            )
            for key in [k for k in self._open if k[0] == run_id]:
                del self._open[key]
            for name_key in [k for k in self._names if k[0] == run_id]:
                del self._names[name_key]
