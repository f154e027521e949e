"""The journal interface every backend implements, and the factory that picks one by URL.

A store keeps two things: one row per run (its current state, lease and result) and the run's
append-only history. Every write for a running run is *fenced*: it names the lease it was made
under, and the store refuses it if another worker has claimed the run since.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from storno._errors import ConfigurationError
from storno._model import Event, Lease, RunRecord, RunStatus

__all__ = ["NewRun", "RunUpdate", "Store", "open_store"]


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to create, with its first history event."""

    run_id: str
    saga: str
    input: str
    created_at: float
    deadline: float | None
    event: Event


@dataclass(frozen=True, slots=True)
class RunUpdate:
    """A change of a run's state written together with history events.

    ``release`` drops the lease: the run is finished, parked for a person, or handed back.
    """

    status: RunStatus
    result: str | None = None
    error: dict[str, Any] | None = None
    release: bool = False


class Store(abc.ABC):
    """Durable home of runs and their histories. All methods are safe to call concurrently."""

    url: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and disconnect."""

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
        status: RunStatus | None = None,
        saga: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[RunRecord]:
        """Runs, newest first, optionally filtered."""

    @abc.abstractmethod
    async def history(self, run_id: str) -> list[Event]:
        """The run's whole history in order."""

    @abc.abstractmethod
    async def write(
        self,
        lease: Lease,
        events: Sequence[Event],
        update: RunUpdate | None,
        *,
        now: float,
        lease_seconds: float,
    ) -> None:
        """Append events and apply the update atomically, renewing the lease.

        Raises :class:`storno.LeaseLostError` if the lease is no longer the run's current one;
        nothing is written then.
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
    ) -> list[tuple[RunRecord, Lease]]:
        """Lease up to ``limit`` runs that are pending or whose lease has expired.

        ``sagas`` limits the claim to runs of sagas this worker can execute.

        ``include_own`` also takes runs still leased to ``owner`` except those in ``exclude``
        (the ones it already executes): a restarted worker with a stable id resumes its dead
        predecessor's runs at once instead of waiting for their leases to expire.
        """

    @abc.abstractmethod
    async def renew(
        self, owner: str, run_ids: Sequence[str], *, now: float, lease_seconds: float
    ) -> set[str]:
        """Extend the leases ``owner`` holds on these runs; return the ids it no longer holds."""


def open_store(url: str) -> Store:
    """The store for a URL: ``sqlite:///relative.db``, ``sqlite:////abs.db`` or a file path."""
    if url.startswith(("postgresql://", "postgres://")):
        raise ConfigurationError(
            "PostgreSQL is not supported by this version of storno yet; use a sqlite:/// URL"
        )
    if "://" in url and not url.startswith("sqlite://"):
        scheme = url.split("://", 1)[0]
        raise ConfigurationError(
            f"unsupported database URL scheme {scheme!r} in {url!r}; use sqlite:///path.db"
        )
    from storno._store._sqlite import SQLiteStore

    return SQLiteStore(url)
