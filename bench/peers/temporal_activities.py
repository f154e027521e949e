"""Temporal activities for the benchmark (``async def``, as the steps of every system).

The idempotency key a W3 activity sends to the provider is the workflow id plus the activity
id, as Temporal's documentation recommends; it is the same on every retry of the activity.
"""

from __future__ import annotations

import os
import time

from temporalio import activity
from temporalio.exceptions import ApplicationError

from bench import common

COMPENSATED: list[str] = []


ACTIVITY_TIMEOUT = float(os.environ.get("BENCH_TEMPORAL_ACTIVITY_TIMEOUT", "10"))
"""start_to_close_timeout of every activity, in seconds (10 s, as in Temporal's samples).
After a worker dies, an activity it was running is retried only when this expires."""


@activity.defn
async def book_slot() -> str:
    return "slot"


@activity.defn
async def release_slot() -> None:
    COMPENSATED.append("release_slot")


@activity.defn
async def charge_card() -> str:
    return "charge"


@activity.defn
async def refund_card() -> None:
    COMPENSATED.append("refund_card")


@activity.defn
async def send_sms() -> str:
    return "sms"


@activity.defn
async def send_correction_sms() -> None:
    COMPENSATED.append("send_correction_sms")


@activity.defn
async def sync_calendar(fail: bool) -> str:
    if fail:
        raise ApplicationError(common.W2_ERROR, non_retryable=True)
    return "calendar"


def _key() -> str:
    info = activity.info()
    return f"{info.workflow_id}/{info.activity_id}"


@activity.defn
async def w3_book_slot() -> str:
    return await common.provider_call(activity.info().workflow_id or "", "book_slot", _key())


@activity.defn
async def w3_charge_card() -> str:
    return await common.provider_call(activity.info().workflow_id or "", "charge_card", _key())


@activity.defn
async def w3_send_sms() -> str:
    return await common.provider_call(activity.info().workflow_id or "", "send_sms", _key())


@activity.defn
async def w3_sync_calendar() -> str:
    return await common.provider_call(activity.info().workflow_id or "", "sync_calendar", _key())


@activity.defn
async def w3_undo() -> None:
    return None


@activity.defn
async def prepare() -> str:
    return "ready"


@activity.defn
async def note_wake() -> float:
    return time.time()


ALL = [
    book_slot,
    release_slot,
    charge_card,
    refund_card,
    send_sms,
    send_correction_sms,
    sync_calendar,
    w3_book_slot,
    w3_charge_card,
    w3_send_sms,
    w3_sync_calendar,
    w3_undo,
    prepare,
    note_wake,
]
