"""The application object: where sagas are registered, runs started, and results awaited."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from storno import _operator
from storno._approvals import check_decision_wanted
from storno._clock import Clock, SystemClock
from storno._definitions import Step
from storno._errors import (
    ConfigurationError,
    RunConflictError,
    RunNotFoundError,
    RunStateError,
)
from storno._handle import RunHandle
from storno._history import fold
from storno._host import EventListener, RunHost
from storno._model import (
    APPROVAL_WAIT,
    ENDED_STATUSES,
    RESERVED_PREFIX,
    Event,
    EventType,
    InboxMessage,
    MessageKind,
    RunRecord,
    RunStatus,
    check_run_id,
    check_time,
    seconds,
)
from storno._plan import Plan, PlanStep, parse_plan, validate_plan
from storno._registry import Registry
from storno._saga import Saga
from storno._serde import DEFAULT_MAX_PAYLOAD_BYTES, describe, encode
from storno._store import NewRun, Store, open_store
from storno._views import RunInfo, describe_run
from storno._worker import Worker
from storno.events._consumers import Handler
from storno.events._protocol import Broker

__all__ = ["DEFAULT_URL", "EventListener", "RunHandle", "Storno"]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_URL = "sqlite:///storno.db"
log = logging.getLogger("storno.app")

ENDED = ENDED_STATUSES
"""States in which no worker will move a run without a person (or never again)."""


def _statuses(
    status: RunStatus | str | Iterable[RunStatus | str] | None,
) -> RunStatus | list[RunStatus] | None:
    """A listing's status filter as the store takes it; an unknown name raises ValueError."""
    if status is None or isinstance(status, RunStatus):
        return status
    if isinstance(status, str):
        return RunStatus(status)
    return [RunStatus(s) for s in status]


class Storno:
    """A storno application: a store, the sagas and steps it knows, and its workers.

    ``url`` defaults to ``$STORNO_URL``, else ``sqlite:///storno.db`` in the working folder;
    ``url_source`` says which (``"argument"``, ``"STORNO_URL"`` or ``"default"``). Leave it
    out in an application that ``storno worker --app`` runs, so that the environment decides.
    Use it as ``async with Storno(url, sagas=[...]) as app:``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        sagas: Iterable[Saga[..., Any]] = (),
        steps: Iterable[Step[..., Any]] = (),
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        lease_seconds: float | timedelta = 30.0,
        clock: Clock | None = None,
        broker: Broker | None = None,
        handlers: Iterable[Handler] = (),
        relay_options: Mapping[str, Any] | None = None,
    ) -> None:
        env = os.environ.get("STORNO_URL")
        self.url = url or env or DEFAULT_URL
        # Where the URL came from: `storno worker` and `serve` refuse a URL written in the
        # code that their --db or $STORNO_URL contradicts, and re-point the others.
        self.url_source = "argument" if url else "STORNO_URL" if env else "default"
        self.store: Store = open_store(self.url)
        if max_payload_bytes < 1024:
            raise ConfigurationError(
                f"max_payload_bytes must be at least 1024, got {max_payload_bytes}"
            )
        self.max_payload_bytes = max_payload_bytes
        self.lease_seconds = seconds(lease_seconds, "lease_seconds") or 30.0
        self.clock: Clock = clock or SystemClock()
        self.registry = Registry()
        # The executing side: what runs and workers in this process need (executors, workers,
        # listeners, the results of runs executing here).
        self.host = RunHost(
            self.store,
            self.clock,
            self.registry,
            lease_seconds=self.lease_seconds,
            max_payload_bytes=self.max_payload_bytes,
        )
        self._opened = False
        self.register(*sagas, *steps)
        # Events: the broker the relay sends the outbox through and the handlers consume from.
        self.broker = broker
        self.handlers: list[Handler] = list(handlers)
        names = [h.name for h in self.handlers]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"two handlers share a consumer name: {sorted(names)}")
        self.relay_options: dict[str, Any] = dict(relay_options or {})

    # --- registry ----------------------------------------------------------------------

    def register(self, *items: Saga[..., Any] | Step[..., Any]) -> None:
        """Make sagas runnable by this application's workers, and steps usable in plans."""
        self.registry.register(*items)

    @property
    def saga_names(self) -> list[str]:
        return self.registry.saga_names

    @property
    def saga_limits(self) -> dict[str, int]:
        """``max_concurrent`` of the registered sagas that have one, by name."""
        return self.registry.saga_limits

    def find_saga(self, name: str) -> Saga[..., Any]:
        return self.registry.find_saga(name)

    def find_step(self, name: str, ref: str | None) -> Step[..., Any]:
        """A registered step, else the step object the history's reference points at."""
        return self.registry.find_step(name, ref)

    # --- lifecycle ---------------------------------------------------------------------

    def use_database(self, url: str) -> None:
        """Point the application at another database before it is opened (``storno worker``
        does this for an application that names none, from ``--db`` or ``$STORNO_URL``)."""
        if self._opened:
            raise ConfigurationError("use_database() must come before the application is opened")
        self.url, self.store = url, open_store(url)
        self.host.store = self.store

    async def open(self) -> None:
        if not self._opened:
            await self.store.open()
            self._opened = True

    async def close(self) -> None:
        for worker in self.host.workers:
            await worker.stop()
        if self._opened:
            await self.store.close()
            self._opened = False
        self.host.close()

    async def __aenter__(self) -> Storno:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def worker(
        self,
        *,
        concurrency: int = 32,
        poll_interval: float = 0.5,
        worker_id: str | None = None,
        relay: bool | None = None,
        consume: bool | None = None,
    ) -> Worker:
        """A worker for this application; ``async with app.worker():`` runs it alongside.

        With a broker it also relays the outbox (``relay``) and runs the handlers
        (``consume``); pass ``False`` to leave either to other processes (``storno relay``).
        """
        return Worker(
            self,
            concurrency=concurrency,
            poll_interval=poll_interval,
            worker_id=worker_id,
            relay=relay,
            consume=consume,
        )

    @property
    def workers(self) -> list[Worker]:
        """The workers running in this process for this application."""
        return self.host.workers

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(run, events)`` after each durable write of a run executed in this
        process, with the events it made durable. Listeners feed metrics, logs and tracing;
        they run on the event loop, so they must be quick, and an error in one is logged and
        ignored (it never affects the run)."""
        self.host.add_listener(listener)

    def remove_listener(self, listener: EventListener) -> None:
        """Stop calling a listener added with :meth:`add_listener`."""
        self.host.remove_listener(listener)

    def wake_workers(self) -> None:
        """Tell this process's workers that a run may have become claimable."""
        self.host.wake_workers()

    # --- starting runs -----------------------------------------------------------------

    async def start(self, saga: Saga[P, R], /, *args: P.args, **kwargs: P.kwargs) -> RunHandle[R]:
        """Start a run of ``saga`` and return its handle at once.

        Choose the run id with ``saga.options(run_id=...)``: starting an existing id returns
        that run (never a second one), and refuses if the saga or input differ.
        """
        self.register(saga)
        text = encode(
            {"args": list(args), "kwargs": dict(kwargs)},
            what=f"input of saga {saga.name!r}",
            limit=self.max_payload_bytes,
        )
        start_at = saga.start_at
        if saga.start_delay is not None:
            start_at = self.clock.now() + saga.start_delay
        return await self._start(saga, text, saga.run_id, saga.timeout, start_at)

    async def start_for_event(
        self,
        saga: Saga[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        correlation_id: str,
        cause: dict[str, Any],
    ) -> RunHandle[Any]:
        """Start a run an event asked for (a ``storno.on`` handler); returns once the run is
        recorded, so that the event can be acknowledged."""
        self.register(saga)
        text = encode(
            {"args": list(args), "kwargs": dict(kwargs)},
            what=f"input of saga {saga.name!r} (from event {cause.get('event_id')})",
            limit=self.max_payload_bytes,
        )
        return await self._start(
            saga, text, saga.run_id, saga.timeout, correlation_id=correlation_id, cause=cause
        )

    async def start_plan(
        self,
        plan: Plan | Mapping[str, Any] | Sequence[PlanStep | Mapping[str, Any]] | str,
        *,
        run_id: str | None = None,
        timeout: float | timedelta | None = None,
    ) -> RunHandle[list[Any]]:
        """Validate a plan (a saga as data) and start it; a bad plan raises
        :class:`storno.PlanError` and nothing runs. The result is the list of step results."""
        parsed = parse_plan(plan)
        validate_plan(parsed, self.registry.lookup_step)
        text = encode(
            {"args": [parsed.to_json()], "kwargs": {}},
            what="plan",
            limit=self.max_payload_bytes,
        )
        return await self._start(self.registry.plan_saga, text, run_id, seconds(timeout, "timeout"))

    async def _start(
        self,
        saga: Saga[..., Any],
        text: str,
        run_id: str | None,
        timeout: float | None,
        start_at: float | None = None,
        *,
        correlation_id: str | None = None,
        cause: dict[str, Any] | None = None,
    ) -> RunHandle[Any]:
        run_id = check_run_id(run_id) if run_id is not None else uuid.uuid4().hex
        now = self.clock.now()
        if start_at is not None and check_time(start_at, "start_at") <= now:
            start_at = None
        begins = start_at or now
        deadline = check_time(begins + timeout, "the deadline") if timeout else None
        await self.open()
        data: dict[str, Any] = {"saga": saga.name}
        if saga.early_approvals:
            data["early_approvals"] = True  # read by approve() in any process, and the waits
        if start_at is not None:
            data["start_at"] = start_at
        if cause is not None:
            data["cause"] = cause  # the event that started it (storno.on)
        event = Event(0, EventType.RUN_CREATED, now, None, data, text)
        correlation = check_run_id(saga.correlation_id or correlation_id or run_id)
        new = NewRun(
            run_id,
            saga.name,
            text,
            now,
            deadline,
            event,
            wake_at=start_at,
            correlation_id=None if correlation == run_id else correlation,
        )
        # A capped saga's runs are always claimed, so that the claim counts them against the
        # limit; others are leased to a local worker as they are created.
        local = start_at is None and not saga.max_concurrent
        started = await self.host.start(new, local=local)
        if started.existing is not None:
            self._check_same(started.existing, saga, text)
        return RunHandle(self, run_id, settled=started.settled, existing=started.existing)

    @staticmethod
    def _check_same(record: RunRecord, saga: Saga[..., Any], text: str) -> None:
        """Refuse to start under an existing run's id with another saga or input."""
        if record.saga != saga.name or record.input != text:
            raise RunConflictError(
                f"run {record.run_id!r} already exists as saga {record.saga!r} with input "
                f"{describe(record.input)}; this start asked for saga {saga.name!r} with "
                f"{describe(text)}. A run id names one run: use a new id for other work"
            )

    async def run(self, saga: Saga[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Start a run and wait for its result (a worker must be running somewhere)."""
        handle = await self.start(saga, *args, **kwargs)
        return await handle.result()

    def get_handle(self, run_id: str) -> RunHandle[Any]:
        """A handle on an existing run."""
        return RunHandle(self, run_id)

    # --- reading runs ------------------------------------------------------------------

    async def describe(self, run_id: str) -> RunInfo:
        """The run's state, steps, compensations and full history."""
        await self.open()
        record = await self.store.get_run(run_id)
        if record is None:
            raise RunNotFoundError(run_id)
        return describe_run(record, await self.store.history(run_id))

    async def list_runs(
        self,
        *,
        status: RunStatus | str | Iterable[RunStatus | str] | None = None,
        saga: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[RunInfo]:
        """Runs, newest first (without their histories): at most ``limit`` (100 unless
        given), skipping the first ``offset``. ``status`` is one status or several (any of
        them). Page on with ``offset``; :meth:`count_runs` says how many there are in all."""
        await self.open()
        wanted = _statuses(status)
        records = await self.store.list_runs(status=wanted, saga=saga, limit=limit, offset=offset)
        return [describe_run(r) for r in records]

    async def count_runs(
        self,
        *,
        status: RunStatus | str | Iterable[RunStatus | str] | None = None,
        saga: str | None = None,
    ) -> int:
        """How many runs :meth:`list_runs` with the same filters lists, without its limit."""
        await self.open()
        return await self.store.count_runs(status=_statuses(status), saga=saga)

    # --- talking to runs ---------------------------------------------------------------

    async def _deliver(self, run_id: str, message: InboxMessage) -> bool:
        await self.open()
        delivery = await self.store.deliver(run_id, message, now=self.clock.now())
        if delivery is None:
            raise RunNotFoundError(run_id)
        if delivery.seq == 0:
            what = f"{message.kind.value} {message.name!r}"
            if message.kind is MessageKind.APPROVAL:
                what = "decision"
            raise RunStateError(
                f"run {run_id} has already ended ({delivery.status.value}); the {what} was not "
                f"stored"
            )
        if not delivery.duplicate:
            self.wake_workers()
        return not delivery.duplicate

    async def signal(
        self,
        run_id: str,
        name: str,
        data: Any = None,
        *,
        id: str | None = None,
        cause: Mapping[str, Any] | None = None,
    ) -> bool:
        """Send a signal to a run; it is buffered until the run waits for it.

        A signal with an ``id`` that was sent before is stored once: returns ``False`` then.
        ``cause`` names the event that sent it (``storno.on`` handlers set it; the run's
        history shows it).
        """
        if not name:
            raise ConfigurationError("a signal needs a name")
        if name.startswith(RESERVED_PREFIX):
            raise ConfigurationError(
                f"signal names starting with {RESERVED_PREFIX!r} are reserved for storno, got "
                f"{name!r}; approvals are given with approve() / reject() (operators only)"
            )
        payload = encode(data, what=f"data of signal {name!r}", limit=self.max_payload_bytes)
        meta: dict[str, Any] = {"sent_by": "api"}
        if cause is not None:
            meta = {"sent_by": "event", "cause": dict(cause)}
        message = InboxMessage(MessageKind.SIGNAL, name, payload, id, meta)
        return await self._deliver(run_id, message)

    async def approve(
        self, run_id: str, *, by: str, note: str | None = None, digest: str | None = None
    ) -> bool:
        """Approve a run waiting in ``ctx.wait_for_approval()``; ``by`` names the operator.

        Refused with :class:`storno.RunStateError` if the run does not wait for a decision
        (unless its saga declares ``early_approvals``) or one is already on its way. The
        approval is bound to what the wait asks to approve (its subject's digest); ``digest``
        makes sure it is what the operator was shown.
        """
        decision = {"approved": True, "by": by, "note": note}
        return await self._decide(run_id, decision, digest)

    async def reject(self, run_id: str, *, by: str, reason: str) -> bool:
        """Reject a run waiting for approval; it compensates unless its code catches that."""
        return await self._decide(run_id, {"approved": False, "by": by, "note": reason})

    async def _decide(
        self, run_id: str, decision: dict[str, Any], digest: str | None = None
    ) -> bool:
        """Send an operator's decision as an approval message, never as a signal."""
        what = "approval" if decision["approved"] else "rejection"
        if not decision["by"]:
            raise ConfigurationError(f"an {what} needs the name of who gives it (by=)")
        await self.open()
        asked = await check_decision_wanted(self.store, run_id, what, digest)
        if asked is not None:
            decision["digest"] = asked  # it applies to that request alone
        payload = encode(decision, what=what, limit=self.max_payload_bytes)
        meta = {"by": decision["by"]}
        return await self._deliver(
            run_id, InboxMessage(MessageKind.APPROVAL, APPROVAL_WAIT, payload, None, meta)
        )

    async def cancel(self, run_id: str, *, by: str, reason: str) -> None:
        """Cancel a run: its completed steps are compensated and it ends ``cancelled``.

        Refused with :class:`storno.RunStateError` once the run is past its point of no
        return (it must go forward) or has ended. A running run stops at its next step.
        """
        await self.open()
        record = await self.store.get_run(run_id)
        if record is None:
            raise RunNotFoundError(run_id)
        if record.status in (RunStatus.NEEDS_ATTENTION, RunStatus.COMPENSATION_FAILED):
            raise RunStateError(
                f"run {run_id} is {record.status.value}: it is parked for a person and cannot "
                f"be cancelled; retry it, compensate it (needs_attention, where nothing past "
                f"its point of no return took effect), or resolve it by hand"
            )
        past = fold(await self.store.history(run_id)).point_of_no_return()
        if past is not None and record.status not in ENDED:
            raise RunStateError(
                f"run {run_id} is past its point of no return (step {past.name!r}, "
                f"#{past.position}); it must go forward and cannot be cancelled"
            )
        meta = {"by": by, "reason": reason}
        await self._deliver(run_id, InboxMessage(MessageKind.CANCEL, "cancel", None, None, meta))

    async def dead_letters(self, *, limit: int = 100, offset: int = 0) -> list[RunInfo]:
        """Runs whose compensation kept failing (``compensation_failed``), newest first."""
        return await self.list_runs(
            status=RunStatus.COMPENSATION_FAILED, limit=limit, offset=offset
        )

    async def retry(self, run_id: str, *, by: str, note: str | None = None) -> None:
        """Retry a dead letter's failed compensations where they failed, or resume a run in
        ``needs_attention`` under the current code; the same keys, a fresh retry budget."""
        await self.open()
        await _operator.retry(self.store, self.clock, run_id, by=by, note=note)
        self.host.settled(run_id)
        self.wake_workers()

    async def compensate(
        self,
        run_id: str,
        *,
        by: str,
        note: str | None = None,
        not_applied: Sequence[str | int] = (),
    ) -> None:
        """Compensate a run in ``needs_attention`` now.

        Allowed only where no step at or after its point of no return took effect or may
        have: ``not_applied`` names steps (by name or position) whose outcome is unknown and
        that the operator found, in the other system, did not take effect. That assertion is
        journaled with the action.
        """
        await self.open()
        await _operator.compensate(
            self.store, self.clock, run_id, by=by, note=note, not_applied=not_applied
        )
        self.host.settled(run_id)
        self.wake_workers()

    async def resolve(self, run_id: str, *, by: str, note: str, outcome: str | None = None) -> None:
        """Close a run that needs a person as handled by hand; the note says what was done.

        A dead letter ends ``compensated``. A run in ``needs_attention`` ends as ``outcome``
        says: ``"completed"`` (finished by hand) or ``"compensated"`` (undone by hand).
        """
        await self.open()
        await _operator.resolve(self.store, self.clock, run_id, by=by, note=note, outcome=outcome)
        self.host.settled(run_id)

    async def query(self, run_id: str, name: str | None = None) -> Any:
        """The values a run published with ``ctx.publish()`` (all, or the one named)."""
        await self.open()
        record = await self.store.get_run(run_id)
        if record is None:
            raise RunNotFoundError(run_id)
        state = record.state or {}
        if name is None:
            return state
        if name not in state:
            known = ", ".join(sorted(state)) or "none yet"
            raise LookupError(f"run {run_id} has published no value {name!r} (published: {known})")
        return state[name]
