"""Consuming events exactly once in effect: ``@storno.on(topic)`` handlers.

A handler looks at an event and says what it means here: start a run (:func:`start`) or
signal runs (:func:`signal`), or nothing. What it asks for is done under an id made from the
consumer's name and the event's id, so a redelivered event finds the run it started, or the
signal it sent, already recorded and is dropped in the same commit: the run's creation (or the
inbox message) is the record that the event was handled. The event is acknowledged only
after that commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from storno._errors import ConfigurationError, RunConflictError, RunNotFoundError, RunStateError
from storno._model import ENDED_STATUSES, check_topic
from storno._saga import Saga
from storno.events._protocol import Broker, EventMessage, Received

if TYPE_CHECKING:
    from storno._app import Storno

__all__ = ["Handler", "Signal", "Start", "consume", "handled_run_id", "on", "signal", "start"]

log = logging.getLogger("storno.handlers")  # "storno.events" is the run events' log

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Start:
    """Start a run of ``saga`` for the event (see :func:`start`)."""

    saga: Saga[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Signal:
    """Signal runs for the event (see :func:`signal`)."""

    name: str
    data: Any = None
    run_id: str | None = None
    correlation_id: str | None = None
    saga: str | None = None


def start(saga: Saga[..., Any], /, *args: Any, **kwargs: Any) -> Start:
    """A handler's answer: start ``saga(*args, **kwargs)``. The run's id is the event's id and
    the consumer's name, its correlation id the event's; a repeated event starts nothing."""
    return Start(saga, args, kwargs)


def signal(
    name: str,
    data: Any = None,
    *,
    run_id: str | None = None,
    correlation_id: str | None = None,
    saga: str | Saga[..., Any] | None = None,
) -> Signal:
    """A handler's answer: send signal ``name`` to the run ``run_id``, or to every unfinished
    run (of ``saga``, if given) whose correlation id is ``correlation_id``: the async-callback
    pattern over a broker. A repeated event sends nothing again."""
    if (run_id is None) == (correlation_id is None):
        raise ConfigurationError("signal() needs exactly one of run_id and correlation_id")
    return Signal(name, data, run_id, correlation_id, saga.name if isinstance(saga, Saga) else saga)


Answer = Start | Signal | Sequence[Start | Signal] | None
HandlerFn = Callable[[EventMessage], Answer | Awaitable[Answer]]


class Handler:
    """A consumer of one or more topics: what ``@storno.on`` makes; register it with the
    application (``Storno(handlers=[...])``)."""

    def __init__(self, fn: HandlerFn, topics: Sequence[str], name: str | None) -> None:
        self.fn = fn
        self.topics = [check_topic(t) for t in topics]
        if not self.topics:
            raise ConfigurationError("@storno.on needs at least one topic")
        self.name: str = name or str(getattr(fn, "__name__", ""))
        if not _NAME.fullmatch(self.name):
            raise ConfigurationError(
                f"consumer name {self.name!r} must be 1 to 64 letters, digits, '_' or '-': it "
                f"names the durable subscription and is part of the ids of what it does"
            )

    def __repr__(self) -> str:
        return f"<storno handler {self.name} on {', '.join(self.topics)}>"

    async def answer(self, message: EventMessage) -> list[Start | Signal]:
        result = self.fn(message)
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            return []
        answers = [result] if isinstance(result, Start | Signal) else list(result)
        for a in answers:
            if not isinstance(a, Start | Signal):
                raise TypeError(
                    f"handler {self.name} returned {a!r}; return storno.events.start(...), "
                    f"storno.events.signal(...), a list of them, or None"
                )
        return answers


@overload
def on(topic: HandlerFn, /) -> Handler: ...
@overload
def on(topic: str, /, *topics: str, name: str | None = None) -> Callable[[HandlerFn], Handler]: ...
def on(
    topic: str | HandlerFn, /, *topics: str, name: str | None = None
) -> Handler | Callable[[HandlerFn], Handler]:
    """``@storno.on("payment.failed")``: handle these topics' events. ``name`` (default: the
    function's name) names the durable consumer; keep it stable, since it is part of the ids
    that make a redelivered event a repeat."""
    if callable(topic):
        raise ConfigurationError('@storno.on needs its topics: @storno.on("order.placed")')

    def wrap(fn: HandlerFn) -> Handler:
        return Handler(fn, [topic, *topics], name)

    return wrap


def handled_run_id(message: EventMessage, consumer: str) -> str:
    """The id of the run a consumer starts for an event: ``<event id>@<consumer>``. Its root
    (before the first ``/``) is the emitting run's, so both share a trace."""
    run_id = f"{message.event_id}@{consumer}"
    if len(run_id) > 200:
        digest = hashlib.sha256(message.event_id.encode()).hexdigest()[:40]
        run_id = f"{digest}@{consumer}"
    return run_id


def _cause(message: EventMessage, consumer: str) -> dict[str, Any]:
    return {
        "event_id": message.event_id,
        "topic": message.topic,
        "consumer": consumer,
        "source": message.source,
        "causation_id": message.causation_id,
        "traceparent": message.traceparent,
        "emitted_at": message.emitted_at,
    }


async def perform(app: Storno, handler: Handler, message: EventMessage) -> list[str]:
    """Do what the handler answers for ``message``; the ids of the runs it touched."""
    touched: list[str] = []
    answers = await handler.answer(message)
    for i, answer in enumerate(answers):
        suffix = f"#{i}" if len(answers) > 1 else ""
        cause = _cause(message, handler.name)
        if isinstance(answer, Start):
            run_id = handled_run_id(message, handler.name + suffix)
            try:
                await app.start_for_event(
                    answer.saga.options(run_id=run_id),
                    answer.args,
                    answer.kwargs,
                    correlation_id=message.correlation_id or message.event_id,
                    cause=cause,
                )
            except RunConflictError as exc:
                # The event's run exists: the event was handled, by an answer that differed
                # (a handler that is not deterministic). Delivering it again cannot help.
                log.warning("event %s: handled before, differently: %s", message.event_id, exc)
            touched.append(run_id)
            continue
        message_id = f"{message.event_id}@{handler.name}{suffix}"
        if answer.run_id is not None:
            targets = [answer.run_id]
        else:
            assert answer.correlation_id is not None
            runs = await app.store.correlated(answer.correlation_id)
            targets = [
                r.run_id
                for r in runs
                if r.status not in ENDED_STATUSES and answer.saga in (None, r.saga)
            ]
            if not targets:
                log.info(
                    "event %s (%s): no unfinished run with correlation id %s to signal %r",
                    message.event_id,
                    message.topic,
                    answer.correlation_id,
                    answer.name,
                )
        for run_id in targets:
            try:
                await app.signal(run_id, answer.name, answer.data, id=message_id, cause=cause)
            except (RunNotFoundError, RunStateError) as exc:
                log.info("event %s: signal %r not stored: %s", message.event_id, answer.name, exc)
            touched.append(run_id)
    return touched


async def consume(
    app: Storno,
    broker: Broker,
    handler: Handler,
    *,
    stopping: asyncio.Event,
    concurrency: int = 64,
    on_handled: Callable[[EventMessage, list[str]], None] | None = None,
) -> None:
    """Read the handler's durable subscription until ``stopping`` is set.

    Up to ``concurrency`` events are handled at once, those of one key one after another in
    the order they arrived. Each is acknowledged after what the handler asked for is
    committed, and delivered again (with backoff) when the handler or the store fails.
    """
    subscription = await broker.subscribe(handler.name, handler.topics)
    slots = asyncio.Semaphore(concurrency)
    tails: dict[str, asyncio.Task[None]] = {}  # the last event in hand per key
    running: set[asyncio.Task[None]] = set()

    async def one(received: Received, before: asyncio.Task[None] | None) -> None:
        try:
            if before is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(before)
            await _handle(app, handler, received, on_handled)
        finally:
            slots.release()

    stop = asyncio.ensure_future(stopping.wait())
    try:
        iterator = aiter(subscription)
        while not stopping.is_set():
            nxt = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
                break
            try:
                received: Received = nxt.result()
            except StopAsyncIteration:
                break
            await slots.acquire()
            key = received.message.key
            before = tails.get(key) if key is not None else None
            task = asyncio.ensure_future(one(received, before))
            running.add(task)
            task.add_done_callback(running.discard)
            if key is not None:
                tails[key] = task
                task.add_done_callback(functools.partial(_forget, tails, key))
        if running:  # let the events in hand finish: each is acked or delivered again
            await asyncio.wait(running)
    finally:
        stop.cancel()
        for task in running:
            task.cancel()
        await subscription.close()


def _forget(tails: dict[str, asyncio.Task[None]], key: str, task: asyncio.Task[None]) -> None:
    if tails.get(key) is task:
        del tails[key]


async def _handle(
    app: Storno,
    handler: Handler,
    received: Received,
    on_handled: Callable[[EventMessage, list[str]], None] | None,
) -> None:
    message = received.message
    try:
        touched = await perform(app, handler, message)
    except Exception as exc:
        n = received.deliveries
        delay = min(2.0 ** max(n - 1, 0), 60.0)
        level = logging.ERROR if n >= 5 else logging.WARNING
        log.log(
            level,
            "handler %s failed on event %s (%s), delivery %d; delivering again in %.0fs: %s",
            handler.name,
            message.event_id,
            message.topic,
            n,
            delay,
            exc,
            exc_info=level == logging.ERROR,
        )
        await received.nak(delay)
        return
    await received.ack()
    if on_handled is not None:
        on_handled(message, touched)
