"""Every error storno raises, rooted in :class:`StornoError`.

Each message says what happened and what to do about it. The tree::

    StornoError
    ├── ConfigurationError          bad URL, unknown saga or step name, invalid step definition
    ├── PlanError                   a plan (saga as data) breaks the step-order rule or names
    │                               unknown steps; refused before anything runs
    ├── SerializationError          a value cannot be stored as JSON, or read back
    │   └── PayloadTooLargeError    the encoded value is over the configured limit
    ├── DeterminismError            saga code no longer matches its recorded history
    │   └── ArgumentMismatchError   a step replayed/retried with arguments other than recorded
    ├── RunConflictError            a run id was started again with another saga or input
    ├── RunStateError               the run's state refuses the request (signal to an ended
    │                               run, cancel after the pivot, retry of a non-dead-letter)
    ├── RunNotFoundError            no run has that id
    ├── StoreError                  the database failed or holds a schema storno cannot read
    │   └── LeaseLostError          another worker took the run over; this worker must stop
    ├── TerminalError               raised by step code: do not retry, end the forward path
    ├── RetryLater                  raised by step code: retry, but not before a given time
    ├── OutcomeUnknownError         raised by step code: the call may or may not have landed
    ├── StepFailedError             a step's forward path ended (raised into the saga body)
    │   └── ChildFailedError        a child run ended without a result
    ├── SignalTimeoutError          a durable signal wait timed out (raised into the body)
    ├── ApprovalRejectedError       a person rejected the run (raised into the body)
    ├── WaitTimeoutError            waiting for a run's result took longer than asked
    └── RunFailedError              a run ended without a result
        ├── RunCompensatedError     ... and its completed steps were compensated
        ├── RunCancelledError       ... because it was cancelled (and compensated)
        ├── CompensationFailedError ... and a compensation kept failing (dead letter)
        └── NeedsAttentionError     ... and it is parked for a person (non-determinism, alarm)
"""

from __future__ import annotations

import traceback
from datetime import datetime, timedelta
from typing import Any

__all__ = [
    "error_info",
    "ApprovalRejectedError",
    "ArgumentMismatchError",
    "ChildFailedError",
    "CompensationFailedError",
    "ConfigurationError",
    "DeterminismError",
    "LeaseLostError",
    "NeedsAttentionError",
    "OutcomeUnknownError",
    "PayloadTooLargeError",
    "PlanError",
    "RunCancelledError",
    "RunCompensatedError",
    "RunConflictError",
    "RunFailedError",
    "RunNotFoundError",
    "RunStateError",
    "RetryLater",
    "SerializationError",
    "SignalTimeoutError",
    "StepFailedError",
    "StoreError",
    "StornoError",
    "TerminalError",
    "WaitTimeoutError",
]


class StornoError(Exception):
    """Root of every error storno raises."""


class ConfigurationError(StornoError):
    """storno was set up wrongly: a bad URL, an unknown saga or step, an invalid step."""


class PlanError(StornoError):
    """A plan was refused before any step ran; the message names the steps and the rule."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class SerializationError(StornoError, TypeError):
    """A value cannot be encoded to JSON for the journal, or decoded back."""


class PayloadTooLargeError(SerializationError):
    """An encoded argument, result or input is larger than the configured limit."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(
            f"{what} is {size:,} bytes as JSON, over the limit of {limit:,} bytes; store large "
            f"data elsewhere and pass a reference, or raise max_payload_bytes"
        )
        self.size = size
        self.limit = limit


class DeterminismError(StornoError):
    """Saga code asked for something other than what its history recorded at that point."""


class ArgumentMismatchError(DeterminismError):
    """A step was retried or replayed with arguments other than those recorded for its key."""

    def __init__(self, step: str, key: str, recorded: str, given: str) -> None:
        super().__init__(
            f"step {step!r} (idempotency key {key}) was first called with {recorded} and is "
            f"now called with {given}; a retry must send the same arguments under the same "
            f"key. The run is parked for a person: fix the saga code or resolve the run"
        )
        self.step = step
        self.key = key
        self.recorded = recorded
        self.given = given


class RunConflictError(StornoError):
    """A run id that already exists was started with a different saga or input."""


class RunStateError(StornoError):
    """The run's state refuses the request: a signal to a run that has ended, a cancel after
    its point of no return, a retry of a run that is not a dead letter."""


class RunNotFoundError(StornoError, LookupError):
    """No run has the given id."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r}; `storno list` shows the runs there are")
        self.run_id = run_id


class StoreError(StornoError):
    """The database failed, or holds a schema this version of storno cannot use."""


class LeaseLostError(StoreError):
    """Another worker holds the run's lease now; this worker's writes for it were refused."""


class TerminalError(StornoError):
    """Raise from step code to end the forward path at once, without retries.

    Use it when the other system said no for good (card declined, slot taken).
    """


class RetryLater(StornoError):
    """Raise from a step or compensation to retry no sooner than ``after`` (seconds, a
    timedelta or an aware datetime), as an HTTP 429 or 503 asks with its Retry-After.

    Any exception with a ``retry_after`` attribute of those types is honoured the same way;
    the wait is capped at the retry policy's maximum interval and bounded by the step's
    timeout and the run's deadline.
    """

    def __init__(self, after: float | timedelta | datetime, message: str | None = None) -> None:
        super().__init__(message or f"retry later (after {after})")
        self.retry_after = after


class OutcomeUnknownError(StornoError):
    """Raise from step code when the call may have landed but no answer came back.

    The engine then reads back through the step's verify function, or retries with the same
    idempotency key; it never assumes the call failed.
    """


class StepFailedError(StornoError):
    """A step's forward path ended: terminal error, retries exhausted, timeout or deadline.

    Raised into the saga body; if the body lets it escape, the run compensates (before the
    pivot) or is parked for a person (after it).
    """

    def __init__(
        self,
        step: str,
        position: int,
        reason: str,
        error_type: str,
        error_message: str,
        outcome_unknown: bool = False,
    ) -> None:
        detail = f"{error_type}: {error_message}" if error_message else error_type
        super().__init__(f"step {step!r} (#{position}) failed: {reason} ({detail})")
        self.step = step
        self.position = position
        self.reason = reason
        self.error_type = error_type
        self.error_message = error_message
        self.outcome_unknown = outcome_unknown


class ChildFailedError(StepFailedError):
    """A child run ended without a result; raised into the parent's body at its call."""

    def __init__(self, saga: str, position: int, child_run_id: str, status: str, message: str):
        super().__init__(
            saga, position, f"child run {child_run_id} ended {status}", status, message
        )
        self.child_run_id = child_run_id
        self.status = status


class SignalTimeoutError(StornoError, TimeoutError):
    """A durable wait for a signal timed out and the saga gave no default.

    Raised into the saga body; if the body lets it escape, the run compensates.
    """


class ApprovalRejectedError(StornoError):
    """A person rejected the run at ``ctx.wait_for_approval()``; ``by`` and ``reason`` say
    who and why. If the body lets it escape, the run compensates."""

    def __init__(self, by: str | None, reason: str | None) -> None:
        super().__init__(f"rejected by {by or 'someone'}: {reason or 'no reason given'}")
        self.by = by
        self.reason = reason


class WaitTimeoutError(StornoError, TimeoutError):
    """Waiting for a run's result took longer than the caller allowed; the run goes on."""


class RunFailedError(StornoError):
    """A run ended without a result. ``run_id``, ``status`` and ``error`` say how."""

    def __init__(self, run_id: str, status: str, error: dict[str, Any] | None) -> None:
        self.run_id = run_id
        self.status = status
        self.error = error or {}
        message = self.error.get("message") or "no error recorded"
        super().__init__(f"run {run_id} ended {status}: {message}")


class RunCompensatedError(RunFailedError):
    """The run's forward path ended and its completed steps were compensated."""


class RunCancelledError(RunFailedError):
    """The run was cancelled by an operator; its completed steps were compensated."""


class CompensationFailedError(RunFailedError):
    """A compensation kept failing; the run is a dead letter waiting for an operator."""


class NeedsAttentionError(RunFailedError):
    """The run is parked for a person: its code no longer matches its history, or it
    cannot make progress after the pivot."""


def error_info(exc: BaseException) -> dict[str, Any]:
    """A JSON-ready description of an error for the history."""
    if isinstance(exc, StepFailedError):
        return {
            "type": "StepFailedError",
            "message": str(exc),
            "step": exc.step,
            "cause": {"type": exc.error_type, "message": exc.error_message},
        }
    kind = type(exc)
    module = "storno" if kind.__module__.startswith("storno.") else kind.__module__
    name = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
    tb = "".join(traceback.format_exception(exc, limit=-4))
    return {"type": name, "message": str(exc)[:2000], "traceback": tb[-4000:]}
