"""Temporal workflows for the benchmark, in a module of their own as Temporal's Python SDK
recommends (workflow code runs in its sandbox; activities are imported passed through).

Temporal has no saga construct: the workflow keeps the compensations of the activities that
completed and, when one fails, runs them in reverse, then re-raises (the pattern of Temporal's
saga samples). ``local=True`` makes every step a local activity instead of an activity.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from bench.peers import temporal_activities as acts


async def _step(fn: Any, local: bool, *args: Any) -> Any:
    timeout = timedelta(seconds=acts.ACTIVITY_TIMEOUT)
    if local:
        return await workflow.execute_local_activity(fn, args=args, start_to_close_timeout=timeout)
    return await workflow.execute_activity(fn, args=args, start_to_close_timeout=timeout)


@workflow.defn
class Booking:
    @workflow.run
    async def run(self, fail: bool, local: bool) -> list[str]:
        compensations: list[Any] = []
        try:
            slot = await _step(acts.book_slot, local)
            compensations.append(acts.release_slot)
            charge = await _step(acts.charge_card, local)
            compensations.append(acts.refund_card)
            sms = await _step(acts.send_sms, local)
            compensations.append(acts.send_correction_sms)
            calendar = await _step(acts.sync_calendar, local, fail)
        except Exception:
            for compensate in reversed(compensations):
                await _step(compensate, local)
            raise
        return [slot, charge, sms, calendar]


@workflow.defn
class W3Booking:
    @workflow.run
    async def run(self, local: bool) -> list[str]:
        compensations: list[Any] = []
        try:
            slot = await _step(acts.w3_book_slot, local)
            compensations.append(acts.w3_undo)
            charge = await _step(acts.w3_charge_card, local)
            compensations.append(acts.w3_undo)
            sms = await _step(acts.w3_send_sms, local)
            compensations.append(acts.w3_undo)
            calendar = await _step(acts.w3_sync_calendar, local)
        except Exception:
            for compensate in reversed(compensations):
                await _step(compensate, local)
            raise
        return [slot, charge, sms, calendar]


@workflow.defn
class Parked:
    def __init__(self) -> None:
        self.woken = False

    @workflow.run
    async def run(self, local: bool) -> float:
        await _step(acts.prepare, local)
        await workflow.wait_condition(lambda: self.woken)
        result: float = await _step(acts.note_wake, local)
        return result

    @workflow.signal
    def wake(self) -> None:
        self.woken = True
