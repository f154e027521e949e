"""Fuzz the API from its own OpenAPI document: no input may get a server error (5xx).

schemathesis reads ``/openapi.json`` from the running server and, for every operation,
sends generated requests (valid ones, then invalid ones) with an operator token; every
response must be a non-5xx answer, and answers to valid requests must conform to the
document. Then its stateful phase chains calls through the links it infers from the
document (start a run, then read, signal, approve, cancel ... that run), with a worker
executing the runs; afterwards every run that was created must still be readable and
listable, since input that breaks a run's pages after it was accepted is the worst kind.
Bounded: a fixed number of examples per operation and mode and of stateful scenarios,
derandomized, so it runs the same way every time.

Left out: schemathesis's check that every schema-valid request is accepted. The document
cannot say which arguments each saga takes, or which runs exist and in which state, so a
well-formed start of an unknown saga or a retry of a run that is no dead letter rightly
gets a 4xx.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="needs schemathesis (the dev extra)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    negative_data_rejection,
    positive_data_acceptance,
)

from test_server_support import OPERATOR_TOKEN, serving  # noqa: E402

EXAMPLES = 10  # per operation and mode
SCENARIOS = 100  # stateful sequences of calls
STEPS = 8  # calls per sequence, at most
HEADERS = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def fuzzer(operation: Any, mode: Any, base_url: str, sent: dict[str, int]) -> Callable[[], None]:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, headers=HEADERS)
        sent[operation.label] = sent.get(operation.label, 0) + 1
        assert response.status_code < 500, (case.method, case.formatted_path, response.text)
        case.validate_response(response, excluded_checks=[positive_data_acceptance])

    return check  # type: ignore[no-any-return]


def test_no_input_causes_a_server_error(db_url: str):
    with serving(db_url, worker=False) as s:
        schema = schemathesis.openapi.from_url(f"{s.url}/openapi.json")
        sent: dict[str, int] = {}
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 22
        assert {
            "GET /api/v1/outbox",
            "POST /api/v1/outbox/{event_id}/retry",
            "POST /api/v1/outbox/{event_id}/discard",
            "GET /api/v1/correlations/{correlation_id}",
        } <= {op.label for op in operations}
        for operation in operations:
            fuzzer(operation, GenerationMode.POSITIVE, s.url, sent)()
            # Unsatisfiable: nothing in the operation can be made invalid (no parameters).
            with contextlib.suppress(Unsatisfiable):
                fuzzer(operation, GenerationMode.NEGATIVE, s.url, sent)()
        print(f"schemathesis: {sum(sent.values())} requests over {len(sent)} operations")
        assert set(sent) == {op.label for op in operations}


def test_sequences_of_calls_cause_no_server_error_and_leave_runs_readable(db_url: str):
    with serving(db_url) as s:
        schema = schemathesis.openapi.from_url(f"{s.url}/openapi.json")
        sent: dict[str, int] = {}
        base = schema.as_state_machine()
        assert base.bundles, "no links between operations were found in the document"

        class Workflow(base):  # type: ignore[misc,valid-type]
            def get_call_kwargs(self, case: Any) -> dict[str, Any]:
                return {"base_url": s.url, "headers": HEADERS}

            def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
                label = f"{case.method} {case.path}"
                sent[label] = sent.get(label, 0) + 1
                assert response.status_code < 500, (case.method, case.formatted_path, response.text)
                # A call meant to lack its token gets it here: whether bad input is refused is
                # the first test's business; this one is about sequences.
                excluded = [positive_data_acceptance, negative_data_rejection]
                case.validate_response(response, excluded_checks=excluded)

        Workflow.run(
            settings=settings(
                max_examples=SCENARIOS,
                stateful_step_count=STEPS,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
        )
        print(f"schemathesis stateful: {sum(sent.values())} calls over {len(sent)} operations")
        assert sum(v for k, v in sent.items() if k.startswith("POST /api/v1/runs/")) > 0
        with httpx.Client(base_url=s.url, headers=HEADERS, timeout=10) as client:
            offset: int | None = 0
            while offset is not None:
                page = client.get("/api/v1/runs", params={"limit": 500, "offset": offset})
                assert page.status_code == 200, page.text
                for run in page.json()["runs"]:
                    shown = client.get(f"/api/v1/runs/{quote(run['id'], safe='')}")
                    assert shown.status_code == 200, (run["id"], shown.text)
                offset = page.json()["next_offset"]
