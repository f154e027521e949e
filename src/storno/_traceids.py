"""Trace and span ids derived from runs, so every process names a run's spans alike (the
OpenTelemetry listener, ``trace_headers``, and the trace context an emitted event carries)."""

from __future__ import annotations

import hashlib

__all__ = ["span_id", "trace_id", "traceparent"]


def _h(*parts: object, bits: int) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    value = int.from_bytes(digest[: bits // 8], "big")
    return value or 1


def trace_id(run_id: str) -> int:
    """The trace id of a run: derived from its root run's id (children share it)."""
    return _h("storno-trace", run_id.split("/", 1)[0], bits=128)


def span_id(run_id: str, what: str = "run", position: int | None = None, attempt: int = 0) -> int:
    """The span id of a run (``what="run"``) or of one attempt (``"step"``, ``"compensation"``,
    ``"wait"``, ``"verify"``) at a position."""
    return _h("storno-span", run_id, what, position, attempt, bits=64)


def traceparent(run_id: str, what: str = "run", position: int | None = None) -> str:
    """A W3C ``traceparent`` for a span of the run."""
    return f"00-{trace_id(run_id):032x}-{span_id(run_id, what, position):016x}-01"
