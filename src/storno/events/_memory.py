"""An in-process broker for tests, examples and single-process choreography: the same
protocol as the real adapters (confirmed publishes, durable consumers, explicit acks,
redelivery, repeats dropped by event id), kept in memory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from storno.events._protocol import EventMessage

__all__ = ["MemoryBroker"]


@dataclass
class _Group:
    topics: set[str]
    queue: asyncio.Queue[tuple[EventMessage, int]] = field(default_factory=asyncio.Queue)
    in_hand: dict[int, tuple[EventMessage, int]] = field(default_factory=dict)


class _Received:
    def __init__(self, group: _Group, message: EventMessage, deliveries: int) -> None:
        self._group = group
        self._message = message
        self._deliveries = deliveries
        self._settled = False
        group.in_hand[id(self)] = (message, deliveries)

    @property
    def message(self) -> EventMessage:
        return self._message

    @property
    def deliveries(self) -> int:
        return self._deliveries

    async def ack(self) -> None:
        self._settled = True
        self._group.in_hand.pop(id(self), None)

    async def nak(self, delay: float | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        self._group.in_hand.pop(id(self), None)
        again = (self._message, self._deliveries + 1)
        if delay:
            asyncio.get_running_loop().call_later(delay, self._group.queue.put_nowait, again)
        else:
            self._group.queue.put_nowait(again)


class _Subscription:
    def __init__(self, group: _Group) -> None:
        self._group = group
        self._closed = False

    def __aiter__(self) -> AsyncIterator[_Received]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[_Received]:
        while not self._closed:
            message, deliveries = await self._group.queue.get()
            yield _Received(self._group, message, deliveries)

    async def close(self) -> None:
        self._closed = True
        group = self._group
        for message, deliveries in list(group.in_hand.values()):
            group.queue.put_nowait((message, deliveries + 1))  # not acked: delivered again
        group.in_hand.clear()


class MemoryBroker:
    """A broker in this process's memory. ``reachable = False`` simulates an outage (every
    publish fails as a connection error); ``refuse(message)`` returning an error makes the
    broker refuse that message (a poison event)."""

    name = "memory"

    def __init__(self, refuse: Callable[[EventMessage], BaseException | None] | None = None):
        self.refuse = refuse
        self.reachable = True
        self.published: list[EventMessage] = []  # every message stored, repeats dropped
        self._seen: set[str] = set()
        self._groups: dict[str, _Group] = {}

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish(self, messages: Sequence[EventMessage]) -> list[BaseException | None]:
        out: list[BaseException | None] = []
        for message in messages:
            if not self.reachable:
                out.append(ConnectionError("memory broker unreachable"))
                continue
            refused = self.refuse(message) if self.refuse else None
            if refused is not None:
                out.append(refused)
                continue
            out.append(None)
            if message.event_id in self._seen:
                continue  # a repeat: confirmed, not stored again
            self._seen.add(message.event_id)
            self.published.append(message)
            for group in self._groups.values():
                if message.topic in group.topics:
                    group.queue.put_nowait((message, 1))
        await asyncio.sleep(0)
        return out

    async def subscribe(self, consumer: str, topics: Sequence[str]) -> _Subscription:
        group = self._groups.get(consumer)
        if group is None:
            group = self._groups[consumer] = _Group(set(topics))
            for message in self.published:  # a new durable consumer starts at the beginning
                if message.topic in group.topics:
                    group.queue.put_nowait((message, 1))
        else:
            group.topics |= set(topics)
        return _Subscription(group)

    async def redeliver(self, message: EventMessage, consumer: str) -> None:
        """Deliver ``message`` to ``consumer`` once more, as a broker may (for tests)."""
        with contextlib.suppress(KeyError):
            self._groups[consumer].queue.put_nowait((message, 2))
