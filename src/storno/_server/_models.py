"""The API's request and response bodies, which also make its OpenAPI document."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "ApproveRequest",
    "CancelRequest",
    "CorrelationModel",
    "ErrorBody",
    "ErrorResponse",
    "Health",
    "Identifier",
    "ActionResult",
    "OutboxActionRequest",
    "OutboxActionResult",
    "OutboxList",
    "RejectRequest",
    "ResolveRequest",
    "RetryRequest",
    "MAX_WAIT",
    "RunList",
    "RunResult",
    "RunSummary",
    "RunDetail",
    "SignalRequest",
    "SignalResult",
    "StartPlanRequest",
    "StartRunRequest",
    "StartResult",
    "Stats",
    "StuckList",
    "check_identifier",
    "check_moment",
    "check_text",
]

MAX_WAIT = 60.0
"""The longest a request may wait for a run's end, in seconds (``wait``)."""

_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_SURROGATES = re.compile(r"[\x00\ud800-\udfff]")


def check_identifier(value: str, what: str = "value") -> str:
    """A run id, saga or signal name: 1-200 printable characters."""
    if not value or len(value) > 200:
        raise ValueError(f"{what} must be 1 to 200 characters, got {len(value)}")
    if _BAD_CHARS.search(value):
        raise ValueError(f"{what} holds control characters or invalid Unicode")
    return value


def check_text(value: str) -> str:
    """Free text (a note, a reason): no NUL and valid Unicode."""
    if _SURROGATES.search(value):
        raise ValueError("text holds NUL characters or invalid Unicode")
    return value


def check_moment(value: datetime | None) -> datetime | None:
    """A time that is a date in UTC too (a naive one is taken as UTC): years 1 to 9999."""
    if value is None:
        return None
    try:
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value.astimezone(UTC).timestamp()
    except (OverflowError, OSError, ValueError):
        raise ValueError(
            f"{value.isoformat()} is out of range: times must fall between the years 1 and "
            f"9999 in UTC"
        ) from None
    return value


Moment = Annotated[datetime, AfterValidator(check_moment)]
Identifier = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(check_identifier)]
Text = Annotated[str, Field(max_length=4000), AfterValidator(check_text)]
Actor = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(check_identifier)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    type: str = Field(description="A stable, machine-readable name of the problem.")
    message: str = Field(description="What was wrong and what to do about it.")
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    version: str


class StartRunRequest(_Body):
    saga: Identifier = Field(description="Name of a saga registered in the served application.")
    args: list[Any] = Field(default_factory=list, description="Positional arguments (JSON).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")
    run_id: Identifier | None = Field(
        default=None,
        description="Choose the run id: starting an existing id returns that run (idempotent); "
        "with another saga or input it is refused with 409.",
    )
    timeout: float | None = Field(default=None, gt=0, le=1e9, description="Deadline, seconds.")
    start_delay: float | None = Field(default=None, gt=0, le=1e9, description="Start later.")
    start_at: Moment | None = Field(default=None, description="Start at (with a time zone).")
    wait: float | None = Field(
        default=None,
        ge=0,
        le=MAX_WAIT,
        description="Seconds to wait for the run to end before answering (at most 60): the "
        "answer's run then holds its result, or its status when the wait ran out.",
    )


class StartPlanRequest(_Body):
    plan: dict[str, Any] | list[Any] = Field(
        description='A plan: {"steps": [{"step": NAME, "args": [...], "kwargs": {...}}]} or '
        "the list of steps."
    )
    run_id: Identifier | None = None
    timeout: float | None = Field(default=None, gt=0, le=1e9)


class SignalRequest(_Body):
    data: Any = Field(default=None, description="The signal's JSON data.")
    id: Identifier | None = Field(
        default=None, description="A repeated id is stored once (duplicate delivery)."
    )


class ApproveRequest(_Body):
    note: Text | None = None
    by: Actor | None = Field(default=None, description="Who decided; default the token's name.")
    digest: Identifier | None = Field(
        default=None,
        description="The digest of what is approved, as the run's wait shows it: refused (409) "
        "if the run now asks to approve something else.",
    )


class RejectRequest(_Body):
    reason: Annotated[Text, Field(min_length=1)]
    by: Actor | None = None


class CancelRequest(_Body):
    reason: Annotated[Text, Field(min_length=1)]
    by: Actor | None = None


class RetryRequest(_Body):
    note: Text | None = None
    by: Actor | None = None


class CompensateRequest(_Body):
    not_applied: Annotated[list[Identifier], Field(max_length=100)] = Field(
        default_factory=list,
        description="Steps (names, or positions as text) of unknown outcome that the operator "
        "checked did not take effect; recorded with the action.",
    )
    note: Text | None = Field(default=None, description="What was checked.")
    by: Actor | None = None


class ResolveRequest(_Body):
    note: Annotated[Text, Field(min_length=1)] = Field(description="What was done by hand.")
    outcome: Literal["completed", "compensated"] | None = Field(
        default=None,
        description="How the run ended by hand; required for a run in needs_attention (a dead "
        "letter is compensated).",
    )
    by: Actor | None = None


class CompensationModel(BaseModel):
    status: str
    attempts: int
    idempotency_key: str
    error: dict[str, Any] | None


class StepModel(BaseModel):
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
    started_at: str | None
    ended_at: str | None
    child_run_id: str | None
    compensation: CompensationModel | None


class HistoryEventModel(BaseModel):
    seq: int
    type: str
    at: str | None
    position: int | None
    data: dict[str, Any]
    value: Any


class RunSummary(BaseModel):
    id: str
    saga: str
    status: str
    created_at: str | None
    updated_at: str | None
    deadline: str | None
    input: Any
    result: Any
    error: dict[str, Any] | None
    owner: str | None
    wake_at: str | None
    parent_run_id: str | None
    correlation_id: str | None = Field(
        default=None, description="The choreography it belongs to; null: its own run id."
    )
    state: dict[str, Any]
    stuck: bool = False


class RunDetail(RunSummary):
    steps: list[StepModel]
    history: list[HistoryEventModel]
    stuck_reason: str | None = None


class RunList(BaseModel):
    runs: list[RunSummary]
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


class StartResult(BaseModel):
    run: RunSummary
    created: bool = Field(description="False when the run id existed (idempotent start).")
    ended: bool = Field(
        default=False, description="The run had ended when the answer was made (see wait)."
    )


class RunResult(BaseModel):
    run_id: str
    saga: str
    status: str
    ended: bool = Field(description="False when the wait ran out first: the run goes on.")
    result: Any = Field(description="The saga's return value once completed, else null.")
    error: dict[str, Any] | None = Field(description="Why it did not complete, if it ended so.")


class SignalResult(BaseModel):
    run_id: str
    signal: str
    delivered: str = Field(description="new, or duplicate when the id was stored before.")
    id: str | None = None


class ActionResult(BaseModel):
    run_id: str
    action: str
    by: str
    run: RunSummary


class QueryResult(BaseModel):
    run_id: str
    name: str | None
    value: Any


class Stats(BaseModel):
    total: int
    by_status: dict[str, int]
    by_saga: dict[str, dict[str, int]]
    dead_letters: int
    stuck: int
    taken_at: str


class StuckRunModel(RunSummary):
    stuck_reason: str
    stuck_threshold_seconds: float


class StuckList(BaseModel):
    runs: list[StuckRunModel]
    older_than: float | None


class OutboxActionRequest(_Body):
    note: Text | None = Field(default=None, description="Why; logged with the action.")
    by: Actor | None = Field(default=None, description="Who acts; default the token's name.")


class OutboxStatsModel(BaseModel):
    pending: int = Field(description="Events committed and not sent yet.")
    dead: int = Field(description="Dead letters: events the broker kept refusing.")
    oldest_pending_at: str | None
    lag_seconds: float = Field(description="How long the oldest unsent event has waited.")


class OutboxRowModel(BaseModel):
    id: int
    event_id: str
    topic: str
    key: str | None
    status: Literal["pending", "sent", "dead", "discarded"]
    attempts: int
    created_at: str | None
    available_at: str | None
    sent_at: str | None
    last_error: str | None
    run_id: str | None = Field(description="The run that emitted it, if a run did.")
    correlation_id: str | None
    causation_id: str | None
    source: str | None
    payload: Any
    headers: dict[str, str]


class OutboxList(BaseModel):
    stats: OutboxStatsModel
    rows: list[OutboxRowModel]
    status: str | None
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


class OutboxActionResult(BaseModel):
    event_id: str
    action: Literal["retry", "discard"]
    by: str
    row: OutboxRowModel = Field(description="The row after the action.")


class CauseModel(BaseModel):
    event_id: str
    topic: str
    source: str | None = Field(description='Who emitted it: "run <id>", or the enqueuer.')
    source_run_id: str | None
    consumer: str | None = Field(description="The storno.on handler that took it.")
    causation_id: str | None
    emitted_at: str | None


class EmittedModel(BaseModel):
    event_id: str
    topic: str
    key: str | None
    position: int
    at: str | None
    payload: Any
    causation_id: str | None
    headers: dict[str, str]


class EventSignalModel(BaseModel):
    name: str
    at: str | None
    position: int | None
    cause: CauseModel


class CorrelatedRunModel(BaseModel):
    run: RunSummary
    cause: CauseModel | None = Field(description="The event that started it, if one did.")
    emitted: list[EmittedModel]
    signals: list[EventSignalModel] = Field(description="Signals events sent it, consumed.")
    ended_at: str | None


class CorrelationEntryModel(BaseModel):
    at: str | None
    run_id: str
    saga: str
    kind: Literal["started", "emitted", "signalled", "ended"]
    cause: CauseModel | None
    emitted: EmittedModel | None
    signal: str | None
    status: str | None
    parent_run_id: str | None
    consumed_by: list[str] = Field(
        description="Runs here that the emitted event started or signalled."
    )


class CorrelationModel(BaseModel):
    correlation_id: str
    runs: list[CorrelatedRunModel] = Field(description="Oldest first.")
    entries: list[CorrelationEntryModel] = Field(description="One timeline across the runs.")
    truncated: bool
