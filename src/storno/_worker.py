"""The worker: claims runs, holds their leases, and drives each through the engine.

A worker claims pending runs (and runs whose lease expired because their worker died) up to
its concurrency, renews the leases of the runs it holds by heartbeat, and gives them up when
it stops so that another worker can take over at once. Runs started in the same process are
handed to it directly, already leased, without a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING

from storno._engine import RunExecution
from storno._errors import ConfigurationError, StoreError
from storno._journal import Birth
from storno._model import Event, Lease, RunRecord, RunStatus
from storno._store import NewRun

if TYPE_CHECKING:
    from storno._app import Storno
    from storno._host import RunHost
    from storno.events._service import EventService

__all__ = ["Worker", "run_task_name"]

log = logging.getLogger("storno.worker")


def run_task_name(run_id: str) -> str:
    """The name of the asyncio task that executes a run in a worker: tools that must find
    that task (the testing kit's simulated crashes) look it up by this name."""
    return f"storno-run:{run_id}"


class Worker:
    """Executes runs of the sagas its application knows. Use ``async with app.worker():``.

    ``worker_id`` should be stable across restarts of the same process slot (a pod name, a
    systemd instance): a worker that starts with the id of a dead one resumes that one's runs
    at once instead of waiting for their leases to expire. Never give two live workers the
    same id.
    """

    def __init__(
        self,
        app: Storno,
        *,
        concurrency: int = 32,
        poll_interval: float = 0.5,
        worker_id: str | None = None,
        relay: bool | None = None,
        consume: bool | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
        if poll_interval <= 0:
            raise ConfigurationError(f"poll_interval must be positive, got {poll_interval}")
        self.app = app
        self._host: RunHost = app.host
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._executions: dict[str, RunExecution] = {}
        self._reserved = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._saturated = False  # the last claim filled every slot: more may be waiting
        # A restart under a dead worker's id inherits its runs, still leased to this id. Until
        # a claim finds no more of them, claims include them (minus the ones running here) and
        # local starts are not adopted, so no run leased to this id is ever claimed twice.
        self._inheriting = False
        self._next_wake: float | None = None  # earliest wake time of a run suspended here
        self._loops: list[asyncio.Task[None]] = []
        # Events: with a broker, a worker relays the outbox and runs the app's handlers.
        has_broker = app.broker is not None
        self.relays = has_broker if relay is None else relay
        self.consumes = has_broker and bool(app.handlers) if consume is None else consume
        if (self.relays or self.consumes) and not has_broker:
            raise ConfigurationError(
                "relay=True and consume=True need a broker: Storno(..., broker=NatsBroker(...))"
            )
        self._events: EventService | None = None

    @property
    def running(self) -> bool:
        return bool(self._loops) and not self._stopping

    @property
    def active_runs(self) -> list[str]:
        return list(self._tasks)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Begin claiming and executing runs in the background."""
        if self._loops:
            return
        await self.app.open()
        # Another process may make work available (PostgreSQL NOTIFY); SQLite polls.
        self._host.store.subscribe(self.wake)
        self._stopping = False
        self._inheriting = True
        await self._claim()
        self._host.attach(self)
        self._loops = [
            asyncio.create_task(self._claim_loop(), name=f"storno-claim-{self.id}"),
            asyncio.create_task(self._heartbeat_loop(), name=f"storno-heartbeat-{self.id}"),
        ]
        if self.relays or self.consumes:
            from storno.events._service import EventService

            self._events = EventService(self.app, relay=self.relays, consume=self.consumes)
            await self._events.start()

    async def run_forever(self) -> None:
        """Start, and work until cancelled (Ctrl-C); then stop cleanly."""
        await self.start()
        try:
            await asyncio.gather(*self._loops)
        finally:
            await self.stop()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let running runs finish for ``grace`` seconds, then hand the rest
        back (their leases expire at once, so another worker resumes them)."""
        if not self._loops:
            return
        self._stopping = True
        events, self._events = self._events, None
        if events is not None:
            await events.stop_consuming()  # no new runs from events while the rest stops
        self._host.detach(self)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        running = dict(self._tasks)
        handed_back: list[str] = []
        if running:
            _, late = await asyncio.wait(running.values(), timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            # Taken before the tasks end: a finished task leaves ``_tasks`` at once.
            handed_back = [run_id for run_id, task in running.items() if task in late]
        if handed_back:
            try:
                await self._host.store.release(self.id, handed_back)
            except StoreError as exc:
                log.warning("could not hand back %d runs: %s", len(handed_back), exc)
        if events is not None:
            await events.stop()  # the relay last: what the runs emitted while stopping goes out

    def wake(self) -> None:
        """Claim now instead of at the next poll (a run was started or became due)."""
        self._wake.set()

    def wake_at(self, when: float) -> None:
        """Claim at ``when`` (clock time) if no poll comes first: a run suspended here is due."""
        if self._next_wake is None or when < self._next_wake:
            self._next_wake = when
            self._wake.set()  # the loop recomputes how long it may sleep

    def try_reserve(self) -> bool:
        """Book a slot for a run about to be created already leased to this worker."""
        if not self.running or self._inheriting:
            return False
        if len(self._tasks) + self._reserved >= self.concurrency:
            self._saturated = True  # the run will be created pending: claim it when free
            return False
        self._reserved += 1
        return True

    def unreserve(self) -> None:
        self._reserved -= 1

    def adopt(self, record: RunRecord, history: list[Event]) -> None:
        """Execute a run that was created already leased to this worker (a reserved slot)."""
        self._reserved -= 1
        self._spawn(record, Lease(record.run_id, self.id, record.epoch), history)

    def start_here(self, run: NewRun, *, lease_seconds: float) -> Birth:
        """Execute, in a reserved slot, a run that its first write will create (one commit
        fewer); the birth says when it is durable."""
        record = RunRecord(
            run.run_id, run.saga, RunStatus.RUNNING, run.input, run.created_at, run.created_at,
            deadline=run.deadline, owner=self.id,
            lease_expires_at=run.created_at + lease_seconds, epoch=1,
            parent_run_id=run.parent_run_id, correlation_id=run.correlation_id,
        )  # fmt: skip
        birth = Birth(run)
        self._reserved -= 1
        self._spawn(record, Lease(run.run_id, self.id, 1), [run.event], birth)
        return birth

    def executing(self, run_id: str) -> bool:
        return run_id in self._tasks

    def _spawn(
        self,
        record: RunRecord,
        lease: Lease,
        history: list[Event] | None,
        birth: Birth | None = None,
    ) -> None:
        task = asyncio.create_task(
            self._execute(record, lease, history, birth), name=run_task_name(record.run_id)
        )
        self._tasks[record.run_id] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._tasks.get(record.run_id) is task:
                del self._tasks[record.run_id]
            if self._saturated or self._host.saga_limits:
                # Free slots, or room under a saga's limit: runs may be waiting for either.
                self._wake.set()

        task.add_done_callback(done)

    async def _execute(
        self,
        record: RunRecord,
        lease: Lease,
        history: list[Event] | None,
        birth: Birth | None,
    ) -> None:
        execution: RunExecution | None = None
        try:
            if history is None:
                history = await self._host.store.history(record.run_id)
            execution = RunExecution(self._host, record, lease, history, birth)
            self._executions[record.run_id] = execution
            await execution.execute()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The lease expires and another attempt resumes the run from its history.
            log.exception("run %s: execution stopped by an unexpected error", record.run_id)
        finally:
            if birth is not None:
                birth.abandon()
            self._executions.pop(record.run_id, None)
            self._host.settled(record.run_id, execution.ended if execution else None)

    async def _claim(self) -> tuple[int, int]:
        """Claim as many runs as there are free slots; return (free, claimed)."""
        free = self.concurrency - len(self._tasks) - self._reserved
        self._saturated = free <= 0
        if free <= 0:
            return free, 0
        inheriting = self._inheriting
        # The slots being claimed stay booked until the runs are spawned: a start in the
        # meantime must not take one too (it creates its run pending instead).
        self._reserved += free
        try:
            claimed = await self._host.store.claim(
                self.id,
                limit=free,
                now=self._host.clock.now(),
                lease_seconds=self._host.lease_seconds,
                sagas=self._host.saga_names,
                include_own=inheriting,
                # Never the runs executing here: a lease that lapsed while its renewals failed
                # (a full disk, a lost connection) must not start a second execution here.
                exclude=list(self._tasks),
                limits=self._host.saga_limits,
            )
            histories: dict[str, list[Event]] = {}
            if claimed:
                try:
                    histories = await self._host.store.histories([r.run_id for r, _ in claimed])
                except StoreError as exc:  # each execution reads its own history then
                    log.warning("loading the histories of claimed runs failed: %s", exc)
        finally:
            self._reserved -= free
        self._saturated = len(claimed) == free
        if inheriting and not self._saturated:
            self._inheriting = False
        for record, lease in claimed:
            self._spawn(record, lease, histories.get(record.run_id))
        return free, len(claimed)

    async def _claim_loop(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake.clear()
            try:
                free, claimed = await self._claim()
                failures = 0
            except StoreError as exc:
                failures += 1
                log.warning("claim failed (%d in a row): %s", failures, exc)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            if claimed and claimed == free:
                continue
            pause = self.poll_interval
            if self._next_wake is not None:
                until_due = self._next_wake - self._host.clock.now()
                if until_due <= 0:
                    self._next_wake = None
                    continue
                pause = min(pause, until_due)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)

    def _released(self, run_id: str) -> bool:
        """Nothing to renew: the run is not executing yet or any more, or gave its lease up."""
        execution = self._executions.get(run_id)
        return execution is None or not execution.holds_lease

    async def _heartbeat_loop(self) -> None:
        interval = self._host.lease_seconds / 3
        while not self._stopping:
            await asyncio.sleep(interval)
            # A run that released its lease (ended, suspended) has nothing left to renew.
            ids = [i for i in self._tasks if not self._released(i)]
            if not ids:
                continue
            try:
                lost = await self._host.store.renew(
                    self.id, ids, now=self._host.clock.now(), lease_seconds=self._host.lease_seconds
                )
            except StoreError as exc:
                log.warning("lease renewal failed: %s", exc)
                continue
            for run_id in lost:
                task = self._tasks.get(run_id)
                if task is not None and not self._released(run_id):
                    log.warning("run %s: lease taken over by another worker; stopping", run_id)
                    task.cancel()
