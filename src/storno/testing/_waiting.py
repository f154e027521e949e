"""Answering a run's waits for signals and approvals, as a person or another system would.

The checks call :meth:`WaitFeeder.feed` while a run is ``waiting``: a signal or approval is
sent only once the run waits for it, through the public ``app.signal()`` / ``app.approve()``,
and once per wait.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from storno._history import fold
from storno._views import RunInfo

if TYPE_CHECKING:
    from storno._app import Storno

__all__ = ["Approve", "WaitFeeder"]

Approve = bool | Callable[[RunInfo], bool]
"""``True`` approves every approval wait, ``False`` rejects it; a callable decides per run."""

APPROVER = "storno-testing"


class WaitFeeder:
    """Sends each waiting run the signals it waits for (from ``signals``: name to payload)
    and approves or rejects its approval waits (``approve``; ``None`` leaves them waiting)."""

    def __init__(self, signals: Mapping[str, Any] | None = None, approve: Approve | None = None):
        self.signals = dict(signals or {})
        self.approve = approve
        self._fed: set[tuple[str, int]] = set()

    @property
    def idle(self) -> bool:
        return not self.signals and self.approve is None

    async def feed(self, app: Storno, run_id: str) -> bool:
        """Answer the run's open signal and approval waits; True if anything was sent."""
        if self.idle:
            return False
        sent = False
        for position, wait in sorted(fold(await app.store.history(run_id)).waits.items()):
            waiting = wait.kind in ("signal", "approval") and wait.status == "waiting"
            if not waiting or (run_id, position) in self._fed:
                continue
            if wait.kind == "approval":
                if self.approve is None:
                    continue
                decision = self.approve
                if callable(decision):
                    decision = decision(await app.describe(run_id))
                if decision:
                    await app.approve(run_id, by=APPROVER, note="approved by the check")
                else:
                    await app.reject(run_id, by=APPROVER, reason="rejected by the check")
            elif wait.name in self.signals:
                data = self.signals[wait.name]
                await app.signal(run_id, wait.name, data, id=f"{APPROVER}-{position}")
            else:
                continue
            self._fed.add((run_id, position))
            sent = True
        return sent
