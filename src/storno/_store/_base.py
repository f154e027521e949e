"""The journal interface every backend implements (:mod:`._factory` picks one by URL).

A store keeps two things: one row per run (its current state, lease and result) and the run's
append-only history. Every write for a running run is *fenced*: it names the lease it was made
under, and the store refuses it if another worker has claimed the run since.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storno._errors import LeaseLostError
from storno._model import Event, EventType, InboxMessage, Lease, RunRecord, RunStatus

if TYPE_CHECKING:
    from storno._store._migrations import SchemaStatus  # a type only: no backend is imported
    from storno._store._outbox import Outbox

__all__ = [
    "ENDED_STATUSES",
    "EXPIRED",
    "Delivery",
    "NewRun",
    "RunExistsError",
    "RunUpdate",
    "Store",
    "lease_lost",
]


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to create, with its first history event."""

    run_id: str
    saga: str
    input: str
    created_at: float
    deadline: float | None
    event: Event
    wake_at: float | None = None  # a scheduled start: no worker claims the run before
    parent_run_id: str | None = None
    correlation_id: str | None = None


class RunExistsError(LeaseLostError):
    """A run meant to be created with its first write exists already: this execution of it
    holds no lease and stops; the start returns the existing run."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} exists already")
        self.run_id = run_id


@dataclass(frozen=True, slots=True)
class RunUpdate:
    """A change of a run's state written together with history events.

    ``release`` drops the lease: the run is finished, suspended, parked for a person, or
    handed back. A run suspended in ``waiting`` is claimable again at ``wake_at`` (never, if
    ``None``, until a message arrives), or at once if its inbox got a message newer than
    ``seen_inbox`` while it was deciding to wait. ``notify`` goes into the inbox of the run
    named by ``notify_run_id`` in the same transaction (a child telling its parent it ended).
    """

    status: RunStatus
    result: str | None = None
    error: dict[str, Any] | None = None
    release: bool = False
    wake_at: float | None = None
    seen_inbox: int | None = None
    notify_run_id: str | None = None
    notify: InboxMessage | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of a message sent to a run's inbox."""

    status: RunStatus  # the run's status when the message arrived
    seq: int  # the message's number in the inbox (0 if the run had ended: not stored)
    duplicate: bool = False  # a message with the same id was stored before


ENDED_STATUSES = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.COMPENSATED,
        RunStatus.COMPENSATION_FAILED,
        RunStatus.NEEDS_ATTENTION,
        RunStatus.CANCELLED,
    }
)
"""Statuses in which a run's inbox takes no more messages (see :meth:`Store.deliver`)."""


EXPIRED = 0.0
"""A lease expiry in the past whatever the clock says: the run is claimable by any worker at
once (a lease handed back, a run an operator made claimable)."""


def lease_lost(lease: Lease) -> LeaseLostError:
    """The error for a write refused because ``lease`` is no longer the run's current one."""
    return LeaseLostError(
        f"run {lease.run_id} is no longer leased to worker {lease.owner} "
        f"(epoch {lease.epoch}); another worker took it over, so this worker's "
        f"writes for it are refused"
    )


class Store(abc.ABC):
    """Durable home of runs and their histories. All methods are safe to call concurrently."""

    url: str
    outbox: Outbox  # the transactional outbox in the same database (storno._store._outbox)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and disconnect."""

    @abc.abstractmethod
    async def exists(self) -> bool:
        """Whether the database the URL names is there at all (the SQLite file, the
        PostgreSQL schema), asked without creating it: :meth:`open` would create it."""

    @abc.abstractmethod
    async def schema_status(self) -> SchemaStatus:
        """Where the database's schema stands against the migrations this storno knows (what
        ``storno db status`` reports); changes nothing, and works before :meth:`open`."""

    @abc.abstractmethod
    async def create_run(
        self, run: NewRun, *, claim_for: str | None, lease_seconds: float
    ) -> tuple[RunRecord, bool]:
        """Insert the run unless its id exists; return the stored run and whether it is new.

        With ``claim_for`` the new run is created already leased to that worker (one write
        instead of two when the caller will execute it at once).
        """

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run with that id, or ``None``."""

    @abc.abstractmethod
    async def list_runs(
        self,
        *,
        status: RunStatus | Sequence[RunStatus] | None = None,
        saga: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[RunRecord]:
        """Runs, newest first, optionally filtered (``status``: one, or any of several)."""

    @abc.abstractmethod
    async def count_runs(
        self, *, status: RunStatus | Sequence[RunStatus] | None = None, saga: str | None = None
    ) -> int:
        """How many runs :meth:`list_runs` with these filters would list without a limit."""

    @abc.abstractmethod
    async def correlated(self, correlation_id: str, *, limit: int = 500) -> list[RunRecord]:
        """The runs of one choreography, oldest first: those carrying ``correlation_id`` and
        the run whose id it is (the run that began it)."""

    async def history(self, run_id: str) -> list[Event]:
        """The run's whole history in order."""
        return (await self.histories([run_id])).get(run_id, [])

    @abc.abstractmethod
    async def histories(self, run_ids: Sequence[str]) -> dict[str, list[Event]]:
        """The whole histories of these runs in one read (a claim loads many at once)."""

    @abc.abstractmethod
    async def write(
        self,
        lease: Lease,
        events: Sequence[Event],
        update: RunUpdate | None,
        *,
        now: float,
        lease_seconds: float,
        state: str | None = None,
        touch: bool = True,
        create: NewRun | None = None,
    ) -> int:
        """Append events and apply the update atomically, renewing the lease; return the
        number of the newest message in the run's inbox (so the engine notices new ones).

        ``state`` replaces the run's published query values (encoded JSON object). With
        ``touch=False`` (no update, no state) a store may only check the lease and append,
        leaving the run's row, its ``updated_at`` and lease expiry as they are: the engine
        touches the row often enough for those, and the heartbeat renews the lease.
        ``create`` inserts that run (leased to ``lease.owner``, epoch 1) in the same
        transaction first; :class:`RunExistsError` if its id is taken, and nothing is written.
        Raises :class:`storno.LeaseLostError` if the lease is no longer the run's current one;
        nothing is written then.
        """

    @abc.abstractmethod
    async def deliver(self, run_id: str, message: InboxMessage, *, now: float) -> Delivery | None:
        """Store a message in the run's inbox and wake the run if it is waiting.

        Returns ``None`` if no run has that id. A message whose ``message_id`` was stored
        before is not stored again (``duplicate``), even once the run has ended; any other
        message to a run that has ended stores nothing (``seq`` 0).
        """

    @abc.abstractmethod
    async def inbox(self, run_id: str, *, after: int = 0) -> list[InboxMessage]:
        """The run's messages numbered above ``after``, in order."""

    @abc.abstractmethod
    async def operate(
        self,
        run_id: str,
        *,
        expected: Sequence[RunStatus],
        status: RunStatus,
        event_type: EventType,
        data: dict[str, Any],
        now: float,
        claimable: bool,
        error: dict[str, Any] | None = None,
        lift_deadline: bool = False,
    ) -> RunRecord | None:
        """An operator's change of a run that no worker holds (a dead letter retried or
        resolved, a completed child asked to compensate): append one event at the end of the
        history and set the status, atomically.

        Returns the updated run, or ``None`` if the run is not in one of ``expected`` or a
        worker holds a live lease on it. ``claimable`` makes it claimable by any worker now.
        ``error`` replaces the run's error (``None`` keeps it); ``lift_deadline`` removes the
        run's deadline (an operator retried a run its deadline had ended).
        """

    @abc.abstractmethod
    async def claim(
        self,
        owner: str,
        *,
        limit: int,
        now: float,
        lease_seconds: float,
        sagas: Sequence[str] | None = None,
        include_own: bool = False,
        exclude: Sequence[str] = (),
        limits: Mapping[str, int] | None = None,
    ) -> list[tuple[RunRecord, Lease]]:
        """Lease up to ``limit`` runs that are due: pending (and past any scheduled start),
        waiting with a wake time that has come, or running/compensating with an expired lease.
        A claimed pending or waiting run becomes running; a compensating one stays so.

        ``sagas`` limits the claim to runs of sagas this worker can execute.

        ``include_own`` also takes runs still leased to ``owner``: a restarted worker with a
        stable id resumes its dead predecessor's runs at once instead of waiting for their
        leases to expire. Runs in ``exclude`` (the ones the worker already executes) are
        never taken.

        ``limits`` caps, per saga name, how many runs of that saga all workers together may
        execute at once (running or compensating under a live lease): the claim counts them
        and takes only what is left, atomically with respect to every other claimer.
        """

    @abc.abstractmethod
    async def renew(
        self, owner: str, run_ids: Sequence[str], *, now: float, lease_seconds: float
    ) -> set[str]:
        """Extend the leases ``owner`` holds on these runs; return the ids it no longer holds."""

    @abc.abstractmethod
    async def release(self, owner: str, run_ids: Sequence[str]) -> None:
        """Hand back the leases ``owner`` holds on these runs (a stopping worker's runs in
        flight): they expire at once, whatever the time, so any worker may claim the runs now.

        Runs ``owner`` no longer holds are left alone. Idle workers elsewhere are woken.
        """

    def subscribe(self, callback: Callable[[], None]) -> None:  # noqa: B027 - optional hook
        """Have ``callback`` called (in the event loop) whenever another process may have made
        work available: a run created, a message delivered, a run made claimable, a wake time
        come. Subscribing the same callback again changes nothing.

        Stores without cross-process notifications keep this no-op: workers find such work
        by polling.
        """
