"""The run host: what an application's runs need from the process that executes them.

:class:`RunHost` is the engine's :class:`~storno._engine.EngineHost` and the workers'
:class:`~storno._worker.WorkerHost`: it holds the executors, the workers running here, the
listeners of committed events, and the futures that tell a waiting ``result()`` that a run
executing here has stopped. Starting a run here (inserted with its first write, already leased
to a local worker) is one named operation, :meth:`RunHost.start`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storno._attempts import Calls
from storno._clock import Clock
from storno._definitions import Step
from storno._errors import StoreError
from storno._model import Event, RunRecord
from storno._registry import Registry
from storno._saga import Saga
from storno._store import NewRun, RunExistsError, Store

if TYPE_CHECKING:
    from storno._worker import Worker

__all__ = ["EventListener", "RunHost", "Started"]

log = logging.getLogger("storno.app")

EventListener = Callable[[RunRecord, list[Event]], None]
"""Called with a run and the events just made durable for it."""


@dataclass(frozen=True, slots=True)
class Started:
    """What :meth:`RunHost.start` did: ``existing`` is the run already under that id, if any;
    ``settled`` is set when the run executes here and will say when it stops."""

    existing: RunRecord | None = None
    settled: asyncio.Future[RunRecord | None] | None = None


class RunHost:
    """The executing side of one application in this process."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        registry: Registry,
        *,
        lease_seconds: float,
        max_payload_bytes: int,
    ) -> None:
        self.store = store
        self.clock = clock
        self.registry = registry
        self.lease_seconds = lease_seconds
        self.max_payload_bytes = max_payload_bytes
        # Saga bodies written as plain functions each hold a thread while they wait on their
        # steps, so they get a pool of their own: sharing one with sync steps could deadlock.
        self.body_executor: Executor = ThreadPoolExecutor(256, thread_name_prefix="storno-saga")
        self.step_executor: Executor = ThreadPoolExecutor(64, thread_name_prefix="storno-step")
        self.calls = Calls(self.step_executor)
        self._workers: list[Worker] = []
        self._waiters: dict[str, list[asyncio.Future[RunRecord | None]]] = {}
        self._listeners: list[EventListener] = []

    # --- what the engine and the workers ask ----------------------------------------------

    @property
    def saga_names(self) -> list[str]:
        return self.registry.saga_names

    @property
    def saga_limits(self) -> dict[str, int]:
        return self.registry.saga_limits

    def find_saga(self, name: str) -> Saga[..., Any]:
        return self.registry.find_saga(name)

    def find_step(self, name: str, ref: str | None) -> Step[..., Any]:
        return self.registry.find_step(name, ref)

    async def start_child(self, run: NewRun) -> None:
        """Create a child run (idempotent by its id) and let a worker pick it up."""
        _, created = await self.store.create_run(
            run, claim_for=None, lease_seconds=self.lease_seconds
        )
        if created:
            self.wake_workers()

    def committed(self, record: RunRecord, events: list[Event]) -> None:
        for listener in self._listeners:
            try:
                listener(record, events)
            except Exception:
                log.exception("event listener %r failed; the run is not affected", listener)

    def wake_workers(self) -> None:
        for worker in self._workers:
            worker.wake()

    def note_wake(self, wake_at: float) -> None:
        for worker in self._workers:
            worker.wake_at(wake_at)

    # --- workers and listeners ----------------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        return list(self._workers)

    def attach(self, worker: Worker) -> None:
        self._workers.append(worker)

    def detach(self, worker: Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def close(self) -> None:
        self.body_executor.shutdown(wait=False, cancel_futures=True)
        self.step_executor.shutdown(wait=False, cancel_futures=True)

    # --- results of runs executing here ---------------------------------------------------

    def watch(self, run_id: str) -> asyncio.Future[RunRecord | None]:
        """A future settled when the run next stops executing in this process (with its final
        state if it ended here, else ``None``)."""
        future: asyncio.Future[RunRecord | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(run_id, []).append(future)
        return future

    def unwatch(self, run_id: str, future: asyncio.Future[RunRecord | None]) -> None:
        waiters = self._waiters.get(run_id, [])
        if future in waiters:
            waiters.remove(future)

    def settled(self, run_id: str, ended: RunRecord | None = None) -> None:
        """A run stopped executing here, or changed by an operator's hand."""
        for future in self._waiters.pop(run_id, []):
            if not future.done():
                future.set_result(ended)

    # --- starting runs ------------------------------------------------------------------

    async def start(self, new: NewRun, *, local: bool) -> Started:
        """Create a run; with ``local``, lease it to a worker here that has a free slot, and
        then insert it with its first write when it can (one commit fewer per run)."""
        worker = next((w for w in self._workers if w.try_reserve()), None) if local else None
        if worker is not None and not worker.executing(new.run_id):
            settled = self.watch(new.run_id)
            birth = worker.start_here(new, lease_seconds=self.lease_seconds)
            try:
                await birth.recorded
            except RunExistsError:
                self.unwatch(new.run_id, settled)
                existing = await self.store.get_run(new.run_id)
                if existing is None:
                    raise StoreError(f"run {new.run_id} was neither created nor found") from None
                return Started(existing=existing)
            return Started(settled=settled)
        try:
            record, created = await self.store.create_run(
                new, claim_for=worker.id if worker else None, lease_seconds=self.lease_seconds
            )
        except BaseException:
            if worker:
                worker.unreserve()
            raise
        if not created:
            if worker:
                worker.unreserve()
            return Started(existing=record)
        if worker:
            settled = self.watch(new.run_id)
            worker.adopt(record, [new.event])
            return Started(settled=settled)
        if new.wake_at is not None:
            self.note_wake(new.wake_at)
        else:
            self.wake_workers()
        return Started()
