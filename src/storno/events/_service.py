"""What a worker runs for events: the outbox relay and the application's handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from storno.events._consumers import Handler, consume
from storno.events._relay import Relay

if TYPE_CHECKING:
    from storno._app import Storno

__all__ = ["EventService"]

log = logging.getLogger("storno.handlers")


class EventService:
    """The relay (``relay``) and one consumer loop per handler (``consume``) of an app."""

    def __init__(self, app: Storno, *, relay: bool, consume: bool) -> None:
        broker = app.broker
        if broker is None:
            raise RuntimeError("the application has no broker")
        self.app = app
        self.broker = broker
        self.relay: Relay | None = (
            Relay(app.store, broker, clock=app.clock, **app.relay_options) if relay else None
        )
        self._consume = consume
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.broker.connect()
        if self.relay is not None:
            await self.relay.start()
        if self._consume:
            for handler in self.app.handlers:
                self._tasks.append(
                    asyncio.create_task(self._run(handler), name=f"storno-consume-{handler.name}")
                )

    async def _run(self, handler: Handler) -> None:
        """Consume for one handler; a subscription that fails is made again, with backoff."""
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await consume(self.app, self.broker, handler, stopping=self._stopping)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "consumer %s: subscription failed, again in %.1fs: %s", handler.name, delay, exc
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, 10.0)

    async def stop_consuming(self) -> None:
        """Stop taking events (those in hand finish first)."""
        self._stopping.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=15.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
        await self.broker.close()
