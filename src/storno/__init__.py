"""storno: durable sagas.

Multi-step workflows across systems with no shared transaction either finish or are cleanly
compensated, and survive crashes on the way. The original booking stays; a counter-booking
undoes its effect.
"""

from storno._app import Storno
from storno._context import Approval, SagaContext, SyncSagaContext
from storno._definitions import (
    NOT_APPLIED,
    UNKNOWN,
    CompensationContext,
    NotApplied,
    Step,
    StepContext,
    Unknown,
    step,
)
from storno._errors import (
    ApprovalRejectedError,
    ArgumentMismatchError,
    ChildFailedError,
    CompensationFailedError,
    ConfigurationError,
    DeterminismError,
    LeaseLostError,
    NeedsAttentionError,
    OutcomeUnknownError,
    PayloadTooLargeError,
    PlanError,
    RetryLater,
    RunCancelledError,
    RunCompensatedError,
    RunConflictError,
    RunFailedError,
    RunNotFoundError,
    RunStateError,
    SerializationError,
    SignalTimeoutError,
    StepFailedError,
    StoreError,
    StornoError,
    TerminalError,
    WaitTimeoutError,
)
from storno._handle import RunHandle
from storno._model import RetryPolicy, RunStatus, StepKind
from storno._plan import Plan, PlanStep, validate_plan
from storno._saga import Saga, saga
from storno._views import CompensationInfo, HistoryEvent, RunInfo, StepInfo
from storno._worker import Worker
from storno.events import EventMessage, on

__version__ = "0.1.0.dev0"

__all__ = [
    # application and runs
    "Storno",
    "RunHandle",
    "Worker",
    "RunStatus",
    "RunInfo",
    "StepInfo",
    "CompensationInfo",
    "HistoryEvent",
    # declaring sagas and steps
    "saga",
    "step",
    "Saga",
    "Step",
    "StepKind",
    "RetryPolicy",
    "SagaContext",
    "SyncSagaContext",
    "StepContext",
    "CompensationContext",
    "Approval",
    "NOT_APPLIED",
    "NotApplied",
    "UNKNOWN",
    "Unknown",
    # sagas as data
    "Plan",
    "PlanStep",
    "validate_plan",
    # events (the outbox, handlers: storno.events, storno.outbox)
    "on",
    "EventMessage",
    # errors
    "StornoError",
    "ConfigurationError",
    "PlanError",
    "SerializationError",
    "PayloadTooLargeError",
    "DeterminismError",
    "ArgumentMismatchError",
    "RunConflictError",
    "RunNotFoundError",
    "RunStateError",
    "StoreError",
    "LeaseLostError",
    "TerminalError",
    "RetryLater",
    "OutcomeUnknownError",
    "StepFailedError",
    "ChildFailedError",
    "SignalTimeoutError",
    "ApprovalRejectedError",
    "WaitTimeoutError",
    "RunFailedError",
    "RunCompensatedError",
    "RunCancelledError",
    "CompensationFailedError",
    "NeedsAttentionError",
]
