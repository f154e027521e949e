"""The vocabulary shared by the journal, the engine and the interfaces.

Step kinds, retry policies, run states, idempotency keys and the records a store keeps. Plain
data only: nothing here touches a database or runs user code.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from storno._errors import ConfigurationError

__all__ = [
    "ACTIVE_STATUSES",
    "APPROVAL_WAIT",
    "COMPENSATION_STATUSES",
    "ENDED_STATUSES",
    "LEGACY_APPROVAL_SIGNAL",
    "NEEDS_A_PERSON_STATUSES",
    "RESERVED_PREFIX",
    "TERMINAL_STATUSES",
    "UNDOING_STATUSES",
    "Event",
    "EventType",
    "InboxMessage",
    "MessageKind",
    "Lease",
    "RetryPolicy",
    "RunRecord",
    "RunStatus",
    "StepKind",
    "check_run_id",
    "check_time",
    "compensation_key",
    "forward_key",
    "parse_duration",
    "seconds",
]


class StepKind(enum.StrEnum):
    """Where a step may stand in a saga and what happens when the forward path ends."""

    COMPENSABLE = "compensable"
    """Can be undone by its compensation; stands before the pivot."""
    PIVOT = "pivot"
    """The point of no return: once it succeeds the run must go forward. At most one."""
    RETRYABLE = "retryable"
    """Idempotent and retried until it succeeds; stands after the pivot."""
    NONCOMPENSABLE = "noncompensable"
    """Cannot be undone (a message a person already read); after every compensable step."""

    @classmethod
    def parse(cls, value: StepKind | str) -> StepKind:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(k.value for k in cls)
            raise ConfigurationError(f"unknown step kind {value!r}; use one of: {names}") from None

    @property
    def is_point_of_no_return(self) -> bool:
        """A pivot, and the first noncompensable step when no pivot is named."""
        return self in (StepKind.PIVOT, StepKind.NONCOMPENSABLE)


class RunStatus(enum.StrEnum):
    """Where a run is: `pending → running ⇄ waiting → completed`, or compensating."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    NEEDS_ATTENTION = "needs_attention"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.COMPENSATED, RunStatus.CANCELLED})
"""States a run never leaves."""

ACTIVE_STATUSES = frozenset({RunStatus.RUNNING, RunStatus.COMPENSATING})
"""States in which a worker holds the run's lease."""

NEEDS_A_PERSON_STATUSES = frozenset({RunStatus.COMPENSATION_FAILED, RunStatus.NEEDS_ATTENTION})
"""States no worker moves a run out of: a dead letter, or a run parked for a person."""

ENDED_STATUSES = TERMINAL_STATUSES | NEEDS_A_PERSON_STATUSES
"""States in which no worker will move a run without a person (or never again)."""

COMPENSATION_STATUSES = frozenset(
    {RunStatus.COMPENSATING, RunStatus.COMPENSATED, RunStatus.COMPENSATION_FAILED}
)
"""States a run reaches by compensating after its forward path failed (a cancelled run
compensates too, but ends as cancelled)."""

UNDOING_STATUSES = COMPENSATION_STATUSES | {RunStatus.CANCELLED}
"""States of a run that is undoing or has undone its steps, after a failure or a cancel: where
the dashboard says "none" when no compensable step had taken effect."""


class EventType(enum.StrEnum):
    """Everything a run's append-only history records."""

    RUN_CREATED = "run_created"
    RUN_RESUMED = "run_resumed"  # a worker picked the run up again from its history
    VALUE_RECORDED = "value_recorded"  # ctx.now()/random()/uuid4()
    STEP_STARTED = "step_started"  # an attempt begins; carries the compensation registration
    STEP_COMPLETED = "step_completed"
    ATTEMPT_FAILED = "attempt_failed"  # will be retried
    OUTCOME_UNKNOWN = "outcome_unknown"  # an attempt with no recorded outcome was found
    VERIFIED = "verified"  # a read-back said whether the unknown attempt landed
    STEP_FAILED = "step_failed"  # the step's forward path ended
    RUN_COMPLETED = "run_completed"
    COMPENSATION_STARTED = "compensation_started"
    COMPENSATION_STEP_STARTED = "compensation_step_started"
    COMPENSATION_STEP_COMPLETED = "compensation_step_completed"
    COMPENSATION_STEP_SKIPPED = "compensation_step_skipped"
    COMPENSATION_ATTEMPT_FAILED = "compensation_attempt_failed"
    COMPENSATION_STEP_FAILED = "compensation_step_failed"
    RUN_COMPENSATED = "run_compensated"
    RUN_COMPENSATION_FAILED = "run_compensation_failed"
    RUN_NEEDS_ATTENTION = "run_needs_attention"
    RUN_WAITING = "run_waiting"  # the run suspended: it holds no worker until it is woken
    TIMER_STARTED = "timer_started"  # ctx.sleep(): carries the wake time
    TIMER_FIRED = "timer_fired"
    SIGNAL_WAIT_STARTED = "signal_wait_started"  # carries the signal name and its timeout
    SIGNAL_RECEIVED = "signal_received"  # a buffered signal consumed at this position
    SIGNAL_TIMED_OUT = "signal_timed_out"
    CHILD_STARTED = "child_started"
    CHILD_ENDED = "child_ended"
    CANCEL_REQUESTED = "cancel_requested"  # who asked and why; compensation follows
    CANCEL_REFUSED = "cancel_refused"  # asked after the point of no return
    RUN_CANCELLED = "run_cancelled"
    OPERATOR_ACTION = "operator_action"  # retry or resolve of a dead letter, with actor and note
    APPROVAL_IGNORED = "approval_ignored"  # an approval given before its wait began, not taken
    EVENT_EMITTED = "event_emitted"  # ctx.emit(): the event went into the outbox with this commit


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a run's history.

    ``data`` holds small JSON-ready metadata (step name, attempt, error); ``payload`` holds the
    encoded value the event carries (arguments, a result, the run's input), kept as JSON text
    so it is stored without being parsed again.
    """

    seq: int
    type: EventType
    at: float
    position: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    payload: str | None = None


class MessageKind(enum.StrEnum):
    """What a message in a run's inbox asks of it."""

    SIGNAL = "signal"  # a named signal with a JSON payload, consumed by ctx.wait_for_signal()
    CANCEL = "cancel"  # an operator asks the run to stop and compensate
    CHILD = "child"  # a child run ended; ``name`` is its run id
    APPROVAL = "approval"  # an operator's decision, consumed by ctx.wait_for_approval() only


RESERVED_PREFIX = "storno."
"""Signal names starting with this are storno's own: nobody may send or wait for them."""

APPROVAL_WAIT = "approval"
"""The name under which the history records a ``ctx.wait_for_approval()`` wait, flagged
``"approval": true`` (it is no signal: approvals are :attr:`MessageKind.APPROVAL` messages).
Older histories recorded it as a wait for the signal :data:`LEGACY_APPROVAL_SIGNAL`."""

LEGACY_APPROVAL_SIGNAL = "storno.approval"
"""How histories written before approvals had a message kind of their own name the wait."""


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """Input for a run from outside its worker: signals, cancel requests, child outcomes.

    Messages are numbered per run (``seq``) and never changed; the run's history records which
    ones it consumed, so a replay consumes the same ones at the same positions. A repeated
    ``message_id`` is stored once.
    """

    kind: MessageKind
    name: str
    payload: str | None = None  # encoded JSON
    message_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # who sent it and why
    seq: int = 0
    sent_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Lease:
    """A worker's claim on a run. ``epoch`` grows with every claim and fences stale writers."""

    run_id: str
    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run as the store keeps it: the current state, derived from its history."""

    run_id: str
    saga: str
    status: RunStatus
    input: str  # encoded JSON {"args": [...], "kwargs": {...}}
    created_at: float
    updated_at: float
    result: str | None = None  # encoded JSON
    error: dict[str, Any] | None = None
    deadline: float | None = None
    owner: str | None = None
    lease_expires_at: float | None = None
    epoch: int = 0
    wake_at: float | None = None  # waiting: when its timer fires; pending: a scheduled start
    parent_run_id: str | None = None
    inbox_seq: int = 0  # number of the newest message in the run's inbox
    state: dict[str, Any] | None = None  # values published with ctx.publish(), for queries
    correlation_id: str | None = None  # the choreography it belongs to (None: its own run id)


def seconds(value: float | timedelta | None, what: str) -> float | None:
    """A duration in seconds from a number or timedelta; ``None`` stays ``None``."""
    if value is None:
        return None
    result = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not result > 0 or not math.isfinite(result):
        raise ConfigurationError(f"{what} must be positive and finite, got {value!r}")
    return result


_BAD_RUN_ID_CHAR = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def check_run_id(run_id: str) -> str:
    """A run id every store and reader takes: 1 to 200 characters, none of them control
    characters (a NUL cannot be stored in PostgreSQL) or lone surrogates."""
    if not run_id or len(run_id) > 200:
        raise ConfigurationError(f"run_id must be 1 to 200 characters, got {len(run_id)}")
    if _BAD_RUN_ID_CHAR.search(run_id):
        raise ConfigurationError(
            f"run_id {run_id!r} holds control characters or invalid Unicode; use printable text"
        )
    return run_id


_TOPIC = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def check_topic(topic: str) -> str:
    """An event topic every broker takes as a subject or routing key: dot-separated words of
    letters, digits, ``_`` and ``-`` (no wildcards), at most 200 characters."""
    if not isinstance(topic, str) or len(topic) > 200 or not _TOPIC.fullmatch(topic):
        raise ConfigurationError(
            f"event topic {topic!r} is not dot-separated words of letters, digits, '_' and '-' "
            f"(like 'payment.charged'), at most 200 characters"
        )
    return topic


def check_event_meta(key: str | None, headers: Any) -> dict[str, str]:
    """An event's key and headers checked: the headers as a plain dict."""
    if key is not None and (not isinstance(key, str) or not key or len(key) > 200):
        raise ConfigurationError(f"event key must be 1 to 200 characters or None, got {key!r}")
    out: dict[str, str] = {}
    for name, value in dict(headers or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigurationError(f"event header {name!r}: names and values must be str")
        low = name.lower()
        if low.startswith(("storno-", "nats-")) or low == "traceparent":
            raise ConfigurationError(
                f"event header {name!r} is reserved: storno sets the storno-*, Nats-* and "
                f"traceparent headers itself"
            )
        out[name] = value
    return out


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1.5h``, ``2d``, ``1w`` as seconds; ``1h30m`` too.

    Raises :class:`ValueError` with a message fit for the user (the CLI shows it as is).
    """
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", text.strip().lower())
    joined = "".join(f"{n}{u}" for n, u in parts)
    if not parts or joined != re.sub(r"\s+", "", text.strip().lower()):
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 1h or 2d")
    total = sum(float(n) * _UNITS[u] for n, u in parts)
    if total <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return total


def check_time(at: float, what: str) -> float:
    """``at`` (seconds since 1970) if it is a date every reader can show, else refused.

    A time past the year 9999 (a ``start_at`` in a far time zone, a deadline or a wait's
    timeout of 1e300 seconds) would be stored, then break every page that shows the run.
    """
    try:
        if math.isfinite(at):
            datetime.fromtimestamp(at, UTC)
            return at
    except (OverflowError, OSError, ValueError):
        pass
    raise ConfigurationError(
        f"{what} is out of range ({at!r} seconds since 1970): storno keeps times between the "
        f"years 1 and 9999 UTC"
    )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed attempt is retried: exponential backoff with jitter, bounded attempts.

    ``maximum_attempts=None`` retries until the step succeeds (the default for retryable
    steps, which stand after the pivot). Errors whose type is in ``non_retryable`` (or that
    subclass one) end the forward path at once, as :class:`storno.TerminalError` always does.
    """

    initial_interval: float = 1.0
    backoff_coefficient: float = 2.0
    maximum_interval: float = 60.0
    maximum_attempts: int | None = 5
    non_retryable: tuple[type[BaseException], ...] = ()
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial_interval < 0 or self.maximum_interval < 0:
            raise ConfigurationError("retry intervals must not be negative")
        if self.backoff_coefficient < 1:
            raise ConfigurationError(
                f"backoff_coefficient must be at least 1, got {self.backoff_coefficient}"
            )
        if self.maximum_attempts is not None and self.maximum_attempts < 1:
            raise ConfigurationError(
                f"maximum_attempts must be at least 1 (or None for no limit), "
                f"got {self.maximum_attempts}"
            )
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"jitter must be between 0 and 1, got {self.jitter}")

    def delay(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the given number of failed attempts (1-based)."""
        base = self.initial_interval * self.backoff_coefficient ** (failed_attempts - 1)
        base = min(base, self.maximum_interval)
        if self.jitter:
            spread = base * self.jitter
            base += (rng or random).uniform(-spread, spread)
        return max(base, 0.0)

    def allows_another(self, failed_attempts: int) -> bool:
        return self.maximum_attempts is None or failed_attempts < self.maximum_attempts

    def is_retryable(self, error: BaseException) -> bool:
        return not isinstance(error, self.non_retryable)


DEFAULT_RETRY = RetryPolicy()
DEFAULT_RETRY_AFTER_PIVOT = RetryPolicy(maximum_attempts=None)
DEFAULT_COMPENSATION_RETRY = RetryPolicy(maximum_attempts=10)
DEFAULT_VERIFY_TIMEOUT = 30.0
"""Seconds one read-back may take; one that takes longer leaves the outcome unknown."""
DEFAULT_THREAD_GRACE = 30.0
"""Seconds a sync call that outlived its timeout is waited for before its position is read
back, retried or compensated (the thread cannot be stopped; the call may still land)."""


def _digest(*parts: str) -> str:
    h = hashlib.sha256("\x1f".join(parts).encode())
    return h.hexdigest()[:32]


def forward_key(run_id: str, position: int, step: str) -> str:
    """The idempotency key of a forward step: stable across retries, restarts and workers.

    Derived from structure only, never from arguments (an agent may send 99.99 on a retry
    of 100.00, and the other system must still see the same key).
    """
    return f"st-{_digest(run_id, str(position), step)}"


def compensation_key(run_id: str, position: int, step: str) -> str:
    """The idempotency key of a step's compensation."""
    return f"stc-{_digest(run_id, str(position), step, 'compensate')}"
