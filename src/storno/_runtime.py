"""What a saga body's context needs from the engine that runs it: a small runtime protocol.

:mod:`storno._context` depends on this protocol only, never on the engine; the engine's
:class:`~storno._engine.RunExecution` implements it. Every operation here takes the run's next
position, so a replay asks for the same things in the same order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from storno._definitions import Step
    from storno._saga import Saga

__all__ = ["Runtime"]

T = TypeVar("T")


class Runtime(Protocol):
    """One execution of one run, as its saga body sees it."""

    @property
    def run_id(self) -> str: ...

    def now(self) -> float:
        """The run's clock (seconds since the epoch): virtual in tests."""

    def wall_time(self) -> datetime:
        """The run's clock as an aware UTC datetime."""

    def random(self) -> float:
        """A random float from the run's generator (not recorded by itself)."""

    async def call_step(self, step: Step[..., Any], args: Any, kwargs: Any) -> Any:
        """Call a step, or return its recorded outcome."""

    async def call_child(self, saga: Saga[..., Any], args: Any, kwargs: Any) -> Any:
        """Start a child run (or find it again) and wait durably for its result."""

    async def gather(self, calls: Iterable[Awaitable[T]]) -> list[T]:
        """Await several calls that each took their position in argument order."""

    async def sleep_until(self, wake_at: float) -> None:
        """Wait durably until ``wake_at``."""

    async def wait_signal(
        self, name: str, timeout: float | None, has_default: bool, default: Any
    ) -> Any:
        """Wait durably for the next signal ``name``; its data."""

    async def wait_approval(
        self, timeout: float | None, early: bool | None, subject: Any = None
    ) -> Any:
        """Wait durably for an operator's decision (on ``subject``, if given); its data."""

    def publish(self, name: str, value: Any) -> None:
        """Publish a value for queries."""

    def emit(self, topic: str, payload: Any, key: str | None, headers: Any) -> str:
        """Put an event into the outbox with the run's next commit; its id. A replay finds
        it recorded and emits nothing."""

    def record_value(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` the first time, recorded; the recorded value on replay."""

    async def record_call(self, name: str, make: Callable[[], Any]) -> Any:
        """Call ``make()`` (sync, or returning an awaitable) once and make its result durable
        before returning it; the recorded value on replay."""
