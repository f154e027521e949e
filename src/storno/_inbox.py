"""A run's inbox as its execution sees it: signals, approvals, cancel requests, child outcomes.

Messages come from outside the worker (an operator, a webhook, a child run) and are numbered per
run; the store tells the execution of the newest one with every commit, and the inbox loads only
what it has not seen. The history records which message each position consumed, so a replay
consumes the same ones at the same places.
"""

from __future__ import annotations

from collections.abc import Iterator

from storno._model import InboxMessage, MessageKind
from storno._store import Store

__all__ = ["Cancelled", "Inbox"]


class Cancelled(BaseException):
    """Raised through a saga body when an operator cancelled the run before its pivot."""

    def __init__(self, by: str | None, reason: str | None) -> None:
        super().__init__(f"cancelled by {by or 'someone'}: {reason or 'no reason given'}")
        self.by = by
        self.reason = reason


class Inbox:
    """The messages of one run loaded so far, and which of them the run has consumed."""

    def __init__(self, store: Store, run_id: str, *, latest: int, consumed: set[int]) -> None:
        self._store = store
        self._run_id = run_id
        self._messages: list[InboxMessage] = []
        self._seen = 0  # newest message loaded
        self._latest = latest  # newest message the store told of
        self._cancel_checked = 0
        self._consumed = set(consumed)

    @property
    def seen(self) -> int:
        """The newest message loaded: a suspended run wakes for anything after it."""
        return self._seen

    def note(self, latest: int) -> None:
        """The store says messages up to ``latest`` exist."""
        self._latest = max(self._latest, latest)

    async def refresh(self) -> None:
        """Load the messages the run has not seen yet."""
        if self._latest <= self._seen:
            return
        await self.load()

    async def load(self) -> None:
        """Load every message delivered so far (an approval wait needs to know which came
        before it began)."""
        for message in await self._store.inbox(self._run_id, after=self._seen):
            self._messages.append(message)
            self._seen = max(self._seen, message.seq)
        self._latest = max(self._latest, self._seen)

    def unconsumed(self, kind: MessageKind, name: str | None = None) -> Iterator[InboxMessage]:
        """Messages of ``kind`` (and ``name``) not consumed yet, oldest first."""
        for message in self._messages:
            fits = message.kind is kind and (name is None or message.name == name)
            if fits and message.seq not in self._consumed:
                yield message

    def consume(self, message: InboxMessage) -> None:
        self._consumed.add(message.seq)

    def take(self, kind: MessageKind, name: str) -> InboxMessage | None:
        """Consume and return the oldest unconsumed message of ``kind`` called ``name``."""
        for message in self.unconsumed(kind, name):
            self.consume(message)
            return message
        return None

    async def cancels(self) -> list[InboxMessage]:
        """Unconsumed cancel requests, if any came since the last look (else none: a look
        costs a store read only when the store has told of new messages)."""
        if self._cancel_checked >= self._latest:
            return []
        await self.refresh()
        self._cancel_checked = self._seen
        return list(self.unconsumed(MessageKind.CANCEL))
