"""A handle on a started run: wait for its result, read its status and history.

A run executing in this process says when it stops (through the application's run host), so
``result()`` waits for that instead of reading the store; otherwise it reads the store with a
growing interval, woken early by any local execution of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

from storno._errors import (
    CompensationFailedError,
    NeedsAttentionError,
    RunCancelledError,
    RunCompensatedError,
    RunFailedError,
    RunNotFoundError,
    WaitTimeoutError,
)
from storno._model import ENDED_STATUSES, RunRecord, RunStatus
from storno._serde import decode
from storno._views import RunInfo

if TYPE_CHECKING:
    from storno._app import Storno

__all__ = ["RunHandle"]

R = TypeVar("R")

_FAILURES: Mapping[RunStatus, type[RunFailedError]] = {
    RunStatus.COMPENSATED: RunCompensatedError,
    RunStatus.COMPENSATION_FAILED: CompensationFailedError,
    RunStatus.NEEDS_ATTENTION: NeedsAttentionError,
    RunStatus.CANCELLED: RunCancelledError,
}


class RunHandle(Generic[R]):
    """A started run: wait for its result, read its status and history."""

    def __init__(
        self,
        app: Storno,
        run_id: str,
        *,
        settled: asyncio.Future[RunRecord | None] | None = None,
        existing: RunRecord | None = None,
    ) -> None:
        self.app = app
        self.run_id = run_id
        # From a start that found the id taken: that run as it was (None: the start created
        # it, or the handle came from get_handle()).
        self.existing = existing
        # Set for a run executing in this process: it settles when the run stops here (with
        # its final state if it ended), so the first look at the store can wait for that.
        self._settled = settled

    def __repr__(self) -> str:
        return f"<storno.RunHandle {self.run_id}>"

    async def status(self) -> RunStatus:
        record = await self.app.store.get_run(self.run_id)
        if record is None:
            raise RunNotFoundError(self.run_id)
        return record.status

    async def describe(self) -> RunInfo:
        return await self.app.describe(self.run_id)

    async def wait(self, timeout: float | None = None) -> RunRecord:
        """Wait until the run ends or ``timeout`` seconds pass; return its record as it then
        stands (ended, or still going: look at ``status``). Never raises for the run's outcome.

        A run executing in this process wakes the wait when it stops here (the run host's
        future), without reading the store in between; a run executing elsewhere is read
        with a growing interval (10 ms doubling to 0.5 s), still woken early by any local
        execution of it.
        """
        loop = asyncio.get_running_loop()
        give_up = None if timeout is None else loop.time() + timeout
        interval = 0.01
        known: RunRecord | None = None
        settled, self._settled = self._settled, None
        if settled is not None:
            # The run executes here and says when it stops: wait for that, not the store.
            with contextlib.suppress(TimeoutError):
                known = await asyncio.wait_for(
                    asyncio.shield(settled), None if give_up is None else give_up - loop.time()
                )
        host = self.app.host
        while True:
            future = host.watch(self.run_id)
            record = known
            if record is None:
                record = await self.app.store.get_run(self.run_id)
                if record is None:
                    host.unwatch(self.run_id, future)
                    raise RunNotFoundError(self.run_id)
            left = None if give_up is None else give_up - loop.time()
            if record.status in ENDED_STATUSES or (left is not None and left <= 0):
                host.unwatch(self.run_id, future)
                return record
            # Executing here: its end settles the future, so there is nothing to read until
            # then. Elsewhere (or not claimed yet): read again after the interval.
            here = any(worker.executing(self.run_id) for worker in host.workers)
            wait = left if here else (interval if left is None else min(interval, left))
            try:
                known = await asyncio.wait_for(future, wait)
            except TimeoutError:
                host.unwatch(self.run_id, future)
                known = None
                if not here:
                    interval = min(interval * 2, 0.5)

    async def result(self, timeout: float | None = None) -> R:
        """Wait until the run ends; return its result or raise why it has none.

        Raises :class:`storno.RunCompensatedError`, :class:`storno.CompensationFailedError`
        or :class:`storno.NeedsAttentionError`; :class:`storno.WaitTimeoutError` if
        ``timeout`` seconds pass first (the run goes on).
        """
        record = await self.wait(timeout)
        if record.status is RunStatus.COMPLETED:
            value: R = decode(record.result or "null", what=f"result of run {self.run_id}")  # type: ignore[assignment]
            return value
        if record.status in ENDED_STATUSES:
            raise _FAILURES[record.status](self.run_id, record.status.value, record.error)
        raise WaitTimeoutError(
            f"run {self.run_id} is still {record.status.value} after {timeout}s; it "
            f"goes on, wait again or look at it with `storno show {self.run_id}`"
        )
