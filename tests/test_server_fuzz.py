"""Fuzz the API from its own OpenAPI document: no input may get a server error (5xx).

schemathesis reads ``/openapi.json`` from the running server and, for every operation,
sends generated requests (valid ones, then invalid ones) with an operator token; every
response must be a non-5xx answer, and answers to valid requests must conform to the
document. Bounded: a fixed number of examples per operation and mode, derandomized, so it
runs the same way every time.

Left out: schemathesis's check that every schema-valid request is accepted. The document
cannot say which arguments each saga takes, or which runs exist and in which state, so a
well-formed start of an unknown saga or a retry of a run that is no dead letter rightly
gets a 4xx.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="needs schemathesis (the dev extra)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from test_server_support import OPERATOR_TOKEN, serving  # noqa: E402

EXAMPLES = 12  # per operation and mode
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
        assert len(operations) >= 15
        for operation in operations:
            fuzzer(operation, GenerationMode.POSITIVE, s.url, sent)()
            # Unsatisfiable: nothing in the operation can be made invalid (no parameters).
            with contextlib.suppress(Unsatisfiable):
                fuzzer(operation, GenerationMode.NEGATIVE, s.url, sent)()
        print(f"schemathesis: {sum(sent.values())} requests over {len(sent)} operations")
        assert set(sent) == {op.label for op in operations}
