"""A forward step's attempts and read-backs: what the engine does with each answer (rules 3, 4).

An attempt whose answer is lost (a timeout, :class:`storno.OutcomeUnknownError`, a worker that
died mid-call) leaves the step's outcome unknown. Only the step's verify function, a later
attempt under the same key that returns, or an error the step declares in ``not_applied_on``
settles it; a 500, a 429, a refused connection or a terminal error on a retry does not, since
such answers often come before the provider looks at the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storno import _faults
from storno._attempts import Budget, Failure, classify, failure_data, run_attempts
from storno._definitions import NOT_APPLIED, UNKNOWN, NotApplied, Step, StepContext
from storno._errors import SerializationError, StepFailedError, error_info
from storno._history import StepState
from storno._inbox import Cancelled
from storno._model import EventType, forward_key
from storno._serde import decode

if TYPE_CHECKING:
    from storno._engine import RunExecution

__all__ = ["ForwardAttempts", "read_back"]

_ROLE = "step"
_SCALARS = frozenset({str, int, bool, type(None)})


class ForwardAttempts:
    """The attempt plan of one forward step call (see :func:`storno._attempts.run_attempts`)."""

    def __init__(
        self,
        x: RunExecution,
        step: Step[..., Any],
        position: int,
        args: Any,
        kwargs: Any,
        args_text: str,
        state: StepState | None,
    ) -> None:
        self.x = x
        self.step = step
        self.position = position
        self.args, self.kwargs, self.args_text = args, kwargs, args_text
        self.state = state
        self.key = forward_key(x.record.run_id, position, step.name)
        self.slot = (x.record.run_id, position, _ROLE)
        self.unknown = bool(state and (state.last_attempt_open or state.outcome_unknown))

    async def run(self) -> Any:
        """Attempt the step until it returns, is found by read-back, or its budget ends."""
        x, state, step = self.x, self.state, self.step
        budget = Budget(
            step.retry,
            made=state.attempts if state else 0,
            spent_before=state.spent_before if state else 0,
            first_start=state.started_at if state and not state.spent_before else None,
            timeout=step.timeout,
            deadline=x.record.deadline,
        )
        last: Failure | None = None
        if state is not None and state.error is not None:
            info = state.error
            retry_after = info.get("retry_after")
            last = Failure(info, info.get("retryable") is not False, False, False, retry_after)
        if state is not None and state.last_attempt_open:
            x.journal.append(
                EventType.OUTCOME_UNKNOWN,
                self.position,
                {"attempt": state.attempts, "reason": "no outcome was recorded for this attempt"},
            )
            last = Failure(
                {"type": "OutcomeUnknown", "message": "the worker stopped mid-attempt"},
                True,
                True,
                False,
            )
        if self.unknown:
            found = await read_back(x, step, self.position, budget.made, self.args, self.kwargs)
            if found is NOT_APPLIED:
                self.unknown = False
            elif found is not UNKNOWN:
                return found
        # An attempt cut short by a stopped worker says nothing about the other system, and
        # an operator's retry starts a fresh budget: neither waits out a backoff first.
        backoff = not (state is not None and (state.last_attempt_open or state.spent_before))
        result = await run_attempts(
            self,
            budget,
            x.host.clock,
            x.jitter_rng,
            last=last,
            backoff=backoff,
            attempt_timeout=step.attempt_timeout,
        )
        return result

    async def begin(self, number: int) -> None:
        x, step = self.x, self.step
        x.journal.append(
            EventType.STEP_STARTED,
            self.position,
            {
                "step": step.name,
                "kind": step.kind.value,
                "key": self.key,
                "attempt": number,
                "ref": step.ref,
            },
            self.args_text,
        )
        await x.journal.commit()
        try:
            # The commit tells of messages that came while the previous step ran.
            await x.check_cancel()
        except Cancelled:
            error = {"type": "Cancelled", "message": "cancelled before the call"}
            data = {"attempt": number, "outcome_unknown": self.unknown, "error": error}
            x.journal.append(EventType.ATTEMPT_FAILED, self.position, {**data, "lost": False})
            raise

    async def call(self, number: int, time_left: float | None) -> Any:
        x, step, run_id = self.x, self.step, self.x.record.run_id
        context = StepContext(run_id, step.name, self.position, self.key, number, step.kind)
        # An Exception raised here counts as the attempt's own failure (fault injection).
        _faults.point("step.started", run_id=run_id, step=step.name, attempt=number)
        result = await x.calls.call(
            step.fn, context, self.args, self.kwargs, time_left, slot=self.slot
        )
        # An Exception injected here stands for a call that landed and lost its answer.
        _faults.point("step.returned", run_id=run_id, step=step.name, attempt=number)
        return self._completed(number, result)

    def _completed(self, number: int, result: Any, **data: Any) -> Any:
        step = self.step
        try:
            text = self.x.encode_value(result, f"result of step {step.name!r}")
        except SerializationError as exc:
            raise self._fail("its result cannot be recorded", error_info(exc), True) from exc
        self.x.journal.append(
            EventType.STEP_COMPLETED, self.position, {"attempt": number, **data}, text
        )
        # The caller gets what a replay would give: the value decoded from its record. A
        # plain str, int, bool or None comes back as itself, so it needs no decoding.
        if type(result) in _SCALARS:
            return result
        return decode(text)

    def classify(self, exc: Exception) -> Failure:
        if isinstance(exc, StepFailedError):
            raise exc  # the result could not be recorded: already journaled as the end
        x, step = self.x, self.step
        return classify(
            exc,
            step.retry,
            step.not_applied_on,
            now=x.host.clock.now(),
            still_running=x.calls.still_running(self.slot),
        )

    async def failed(self, number: int, failure: Failure) -> Any:
        x, step = self.x, self.step
        if failure.still_running:
            # The thread goes on and may still land: say so durably, then wait for it.
            reason = (
                f"the attempt timed out but its call is still running in its thread and may "
                f"still land; waiting up to {step.thread_grace:g}s for it"
            )
            data = {"attempt": number, "reason": reason, "still_running": True}
            x.journal.append(EventType.OUTCOME_UNKNOWN, self.position, data)
            await x.journal.commit()
            late = await x.calls.settle(self.slot, step.thread_grace)
            if late is not None and late.finished:
                if late.error is None:
                    return self._completed(number, late.value, late=True)
                if isinstance(late.error, Exception):
                    failure = classify(
                        late.error, step.retry, step.not_applied_on, now=x.host.clock.now()
                    )
        if failure.lost:
            self.unknown = True
        elif failure.not_applied:
            self.unknown = False
        x.journal.append(
            EventType.ATTEMPT_FAILED, self.position, failure_data(number, failure, self.unknown)
        )
        if failure.lost:
            found = await read_back(x, step, self.position, number, self.args, self.kwargs)
            if found is NOT_APPLIED:
                self.unknown = False
            elif found is not UNKNOWN:
                return found
        return None

    def give_up(self, reason: str, last: Failure | None) -> BaseException:
        if self.x.calls.still_running(self.slot):
            reason += "; its last call is still running and may still land"
        return self._fail(reason, last.info if last else {}, self.unknown)

    def _fail(self, reason: str, error: dict[str, Any], unknown: bool) -> StepFailedError:
        step = self.step
        failure = StepFailedError(
            step.name,
            self.position,
            reason,
            error.get("type", "Error"),
            error.get("message", ""),
            unknown,
        )
        self.x.journal.append(
            EventType.STEP_FAILED,
            self.position,
            {"reason": reason, "error": error_info(failure), "outcome_unknown": unknown},
        )
        return failure


async def read_back(
    x: RunExecution,
    step: Step[..., Any],
    position: int,
    attempt: int,
    args: Any,
    kwargs: Any,
) -> Any:
    """Ask the other system whether an attempt of unknown outcome landed (rule 3).

    Returns the step's result if it did, :data:`NOT_APPLIED` if it did not, and
    :data:`UNKNOWN` when there is no verify function, it failed, or the call may still land
    (a sync call still running in its thread is never read back as not applied).
    """
    if step.verify_fn is None:
        return UNKNOWN
    key = forward_key(x.record.run_id, position, step.name)
    context = StepContext(x.record.run_id, step.name, position, key, attempt, step.kind)
    call_slot = (x.record.run_id, position, _ROLE)
    # A call still in flight when the read-back starts may land while it runs: its "not
    # applied" would then be stale.
    was_running = x.calls.still_running(call_slot)
    try:
        found = await x.calls.call(
            step.verify_fn,
            context,
            args,
            kwargs,
            step.verify_timeout,
            slot=(x.record.run_id, position, "verify"),
        )
    except Exception as exc:
        x.journal.append(
            EventType.OUTCOME_UNKNOWN,
            position,
            {"attempt": attempt, "reason": "read-back failed", "error": error_info(exc)},
        )
        return UNKNOWN
    if isinstance(found, NotApplied):
        if was_running or x.calls.still_running(call_slot):
            reason = "read-back found nothing, but the call is still running and may still land"
            x.journal.append(
                EventType.OUTCOME_UNKNOWN, position, {"attempt": attempt, "reason": reason}
            )
            return UNKNOWN
        x.journal.append(EventType.VERIFIED, position, {"attempt": attempt, "applied": False})
        return NOT_APPLIED
    text = x.encode_value(found, f"read-back result of step {step.name!r}")
    x.journal.append(EventType.VERIFIED, position, {"attempt": attempt, "applied": True}, text)
    return decode(text)
