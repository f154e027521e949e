"""Prometheus metrics, OpenTelemetry spans and structured logs, from real runs on a server."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from storno._server._tracing import span_id, trace_id
from storno.server import JsonFormatter, Tracing
from test_server_support import (
    READ_TOKEN,
    REFUND_API,
    TRACE_HEADERS,
    serving,
    start,
    wait_status,
)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def compensated_and_dead(api: Any) -> tuple[str, str]:
    ok = start(api, "booking", "ada", 10, True)
    wait_status(api, ok, "compensated")
    REFUND_API["down"] = True
    try:
        dead = start(api, "booking", "bob", 20, True)
        wait_status(api, dead, "compensation_failed")
    finally:
        REFUND_API["down"] = False
    return ok, dead


def test_metrics_from_the_store_and_from_events(db_url: str):
    with serving(db_url) as s, s.client() as api:
        compensated_and_dead(api)
        waiting = start(api, "approval", 1)
        wait_status(api, waiting, "waiting")
        with s.client(token=READ_TOKEN) as reader:
            response = reader.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        m = samples(response.text)
        assert value(m, "storno_runs", saga="booking", status="compensated") == 1
        assert value(m, "storno_runs", saga="booking", status="compensation_failed") == 1
        assert value(m, "storno_runs", saga="approval", status="waiting") == 1
        assert value(m, "storno_dead_letters") == 1
        assert value(m, "storno_stuck_oldest_seconds") == 0
        step = {"saga": "booking", "step": "charge_card"}
        assert value(m, "storno_unknown_outcomes_total", **step) == 2
        assert value(m, "storno_readbacks_total", **step, landed="yes") == 2
        assert value(m, "storno_step_duration_seconds_count", **step, outcome="unknown") == 2
        assert value(m, "storno_step_duration_seconds_count", **step, outcome="completed") == 0
        calendar = {"saga": "booking", "step": "sync_calendar"}
        assert value(m, "storno_step_duration_seconds_count", **calendar, outcome="failed") == 2
        assert (
            value(
                m,
                "storno_step_attempt_failures_total",
                **calendar,
                error_type="storno.TerminalError",
            )
            == 2
        )
        assert (
            value(
                m,
                "storno_compensation_duration_seconds_count",
                saga="booking",
                step="send_sms",
                outcome="completed",
            )
            == 2
        )
        assert value(m, "storno_compensation_failures_total", **step) == 1
        assert value(m, "storno_runs_ended_total", saga="booking", status="compensated") == 1
        assert (
            value(m, "storno_runs_ended_total", saga="booking", status="compensation_failed") == 1
        )
        assert value(m, "storno_run_duration_seconds_count", saga="booking", status="compensated")


def test_public_metrics_need_no_token(db_url: str):
    with serving(db_url, public_metrics=True, worker=False) as s, s.client(token=None) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/api/v1/runs").status_code == 401


@pytest.fixture
def spans() -> Iterator[tuple[Tracing, Any]]:
    sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="needs the storno[otel] extra")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(tracer_provider=provider), exporter
    provider.shutdown()


def test_tracing_spans_per_run_and_attempt(db_url: str, spans: tuple[Tracing, Any]):
    tracing, exporter = spans
    with serving(db_url, tracing=tracing) as s, s.client() as api:
        run_id = start(api, "booking", "ada", 10, True)
        wait_status(api, run_id, "compensated")
        parent = start(api, "conference", ["grace"])
        wait_status(api, parent, "completed")
    finished = {
        (sp.name, sp.attributes["storno.run_id"]): sp for sp in exporter.get_finished_spans()
    }
    ours = [sp for (name, rid), sp in finished.items() if rid == run_id]
    assert {sp.context.trace_id for sp in ours} == {trace_id(run_id)}
    run_span = finished[("run booking", run_id)]
    assert run_span.context.span_id == span_id(run_id) and run_span.parent is None
    assert run_span.attributes["storno.status"] == "compensated"
    assert run_span.status.status_code.name == "ERROR"
    names = sorted(sp.name for sp in ours)
    assert names == sorted(
        [
            "run booking",
            "step book_slot",
            "step charge_card",  # attempt 1: outcome unknown
            "read-back charge_card",
            "step send_sms",
            "step sync_calendar",
            "compensate send_sms",
            "compensate charge_card",
            "compensate book_slot",
        ]
    )
    for sp in ours:
        if sp is not run_span:
            assert sp.parent.span_id == span_id(run_id)
    charge = finished[("step charge_card", run_id)]
    assert charge.attributes["storno.outcome_unknown"] is True
    assert charge.attributes["storno.idempotency_key"].startswith("st-")
    comps = sorted(
        (sp for sp in ours if sp.name.startswith("compensate")), key=lambda sp: sp.start_time
    )
    assert [sp.name for sp in comps] == [
        "compensate send_sms",
        "compensate charge_card",
        "compensate book_slot",
    ]
    # The headers step code sent carry the very span the attempt was recorded as.
    book = finished[("step book_slot", run_id)]
    expected = f"00-{trace_id(run_id):032x}-{book.context.span_id:016x}-01"
    assert TRACE_HEADERS[run_id] == {"traceparent": expected}
    # A child run joins its parent's trace, under the parent's call.
    child = finished[("run lodging", f"{parent}/0")]
    assert child.context.trace_id == trace_id(parent)
    assert child.parent.span_id == span_id(parent, "step", 0, 1)
    assert finished[("step lodging", parent)].context.span_id == span_id(parent, "step", 0, 1)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_structured_logs_name_run_and_step(db_url: str):
    handler = Lines()
    events = logging.getLogger("storno.events")
    events.addHandler(handler)
    old_level = events.level
    events.setLevel(logging.INFO)
    try:
        with serving(db_url) as s, s.client() as api:
            run_id = start(api, "booking", "ada", 10, True)
            wait_status(api, run_id, "compensated")
    finally:
        events.removeHandler(handler)
        events.setLevel(old_level)
    records = [json.loads(line) for line in handler.lines]
    mine = [r for r in records if r.get("run_id") == run_id]
    assert mine and all(r["saga"] == "booking" for r in mine)
    stepped = [r for r in mine if r.get("position") is not None]
    assert stepped and all(r.get("step") for r in stepped), stepped
    by_event = {(r["event"], r["step"]) for r in stepped}
    assert ("attempt_failed", "charge_card") in by_event
    assert ("verified", "charge_card") in by_event
    assert ("compensation_step_completed", "book_slot") in by_event
    failed = next(r for r in mine if r["event"] == "step_failed")
    assert failed["level"] == "error" and "sync_calendar" in failed["message"]
    assert mine[-1]["event"] == "run_compensated"
