"""NATS JetStream as storno's broker: one stream, a durable pull consumer per topic.

``pip install 'storno[nats]'``. A topic ``order.created`` is the subject
``<subject_prefix>order.created`` in the stream ``stream``; every message carries
``Nats-Msg-Id: <event id>``, so the stream drops a resend inside its duplicate window.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from storno.events._protocol import EventMessage

__all__ = ["MessageTooLargeError", "NatsBroker", "NatsReceived", "NatsSubscription"]

log = logging.getLogger("storno.events.nats")

_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_-]+")
_STREAM_NAME_IN_USE = 10058  # JetStream's error code: the stream exists with another config
_FETCH_WAIT = 1.0  # seconds a pull request lingers on the server when nothing is there
_RETRY_PAUSE = 1.0  # after a fetch failed for another reason than "nothing yet"


class MessageTooLargeError(ValueError):
    """A message the stream or server would refuse for its size: a refusal, not an outage."""


class NatsBroker:
    """storno's :class:`~storno.events.Broker` on NATS JetStream (tested on nats-server 2.9).

    ``connect()`` creates the stream (file storage, ``duplicate_window`` seconds of
    deduplication) when ``ensure_stream`` and it is missing. ``subscribe`` keeps one durable
    pull consumer per (consumer, topic), since nats-server 2.9 allows one filter subject per
    consumer; a consumer created after events were stored starts at the stream's beginning
    (``DeliverPolicy.ALL``), so it misses none the stream still holds. The client reconnects
    on its own for as long as it is open (``max_reconnect_attempts=-1`` unless
    ``connect_options`` say otherwise); meanwhile ``publish`` returns errors after
    ``publish_timeout``, never blocks longer.
    """

    name = "nats"

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        stream: str = "storno",
        subject_prefix: str = "storno.",
        ensure_stream: bool = True,
        duplicate_window: float = 120.0,
        publish_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        ack_wait: float = 30.0,
        max_deliver: int | None = None,
        batch: int = 10,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not subject_prefix.endswith(".") or _has_wildcard(subject_prefix):
            raise ValueError(
                f"subject_prefix must end with '.', without wildcards: {subject_prefix!r}"
            )
        if publish_timeout <= 0 or connect_timeout <= 0 or ack_wait <= 0 or batch < 1:
            raise ValueError(
                "publish_timeout, connect_timeout, ack_wait and batch must be positive"
            )
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.ensure_stream = ensure_stream
        self.duplicate_window = duplicate_window
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.batch = batch
        self.connect_options = dict(connect_options or {})
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._max_msg_size = -1  # the stream's limit, read at connect (-1: none)
        self._subscriptions: set[NatsSubscription] = set()

    def subject(self, topic: str) -> str:
        """The subject a topic's messages are published on."""
        return self.subject_prefix + topic

    def consumer_name(self, consumer: str, topic: str) -> str:
        """The JetStream durable consumer of ``consumer`` for ``topic``: readable, and distinct
        for every (consumer, topic) pair even where sanitizing makes two look alike."""
        digest = hashlib.sha256(f"{consumer}\0{topic}".encode()).hexdigest()[:10]
        readable = f"{_clean(consumer)[:60]}_{_clean(topic)[:60]}"
        return f"{readable}_{digest}"

    async def connect(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            return
        options: dict[str, Any] = {
            "name": "storno",
            "max_reconnect_attempts": -1,
            "error_cb": _on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": _on_reconnected,
            **self.connect_options,
        }
        nc = Client()
        try:
            # nats-py retries an unreachable server forever with max_reconnect_attempts=-1.
            async with asyncio.timeout(self.connect_timeout):
                await nc.connect(servers=self.servers, **options)
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        js = nc.jetstream(timeout=self.publish_timeout)
        try:
            if self.ensure_stream:
                await self._ensure_stream(js)
            else:
                with contextlib.suppress(Exception):  # the limit is then found out the hard way
                    info = await js.stream_info(self.stream)
                    self._max_msg_size = info.config.max_msg_size or -1
        except BaseException:
            await nc.close()
            raise
        self._nc, self._js = nc, js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            info = await js.stream_info(self.stream)
            self._max_msg_size = info.config.max_msg_size or -1
            return
        except nats.js.errors.NotFoundError:
            pass
        config = api.StreamConfig(
            name=self.stream,
            subjects=[self.subject_prefix + ">"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            duplicate_window=self.duplicate_window,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:  # else created meanwhile, by someone else
                raise

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        for subscription in list(self._subscriptions):
            await subscription.close()
        if nc is None or nc.is_closed:
            return
        try:
            # drain() flushes what was sent; it refuses while reconnecting and may be slow.
            async with asyncio.timeout(self.publish_timeout):
                await nc.drain()
        except Exception:
            await nc.close()

    async def publish(self, messages: Sequence[EventMessage]) -> list[BaseException | None]:
        js = self._jetstream()
        return list(await asyncio.gather(*(self._publish_one(js, m) for m in messages)))

    async def _publish_one(
        self, js: JetStreamContext, message: EventMessage
    ) -> BaseException | None:
        headers = message.wire_headers()
        headers["Nats-Msg-Id"] = message.event_id
        too_large = self._too_large(message, headers)
        if too_large is not None:
            return too_large
        try:
            async with asyncio.timeout(self.publish_timeout):
                pending = await js.publish_async(
                    self.subject(message.topic),
                    message.payload.encode(),
                    wait_stall=self.publish_timeout,
                    stream=self.stream,
                    headers=headers,
                )
                # Cancelling the ack's future on timeout frees its slot in nats-py's window.
                await pending  # a PubAck; duplicate=True is a repeat the stream already holds
        except TimeoutError:
            return TimeoutError(
                f"event {message.event_id}: not confirmed by NATS within {self.publish_timeout}s"
            )
        except Exception as exc:
            return exc
        return None

    def _too_large(self, message: EventMessage, headers: Mapping[str, str]) -> BaseException | None:
        """A message over the server's or the stream's size limit, refused before it is sent:
        the server answers such a publish with a status nats-py hands to its error callback,
        not to the publish, which would then look like an outage and be retried forever."""
        size = len(message.payload.encode()) + sum(len(k) + len(v) + 4 for k, v in headers.items())
        limits = [n for n in (self._max_msg_size, getattr(self._nc, "max_payload", 0)) if n > 0]
        if limits and size > min(limits):
            return MessageTooLargeError(
                f"event {message.event_id} is {size} bytes with its headers; the NATS "
                f"{'stream' if min(limits) == self._max_msg_size else 'server'} takes at most "
                f"{min(limits)}"
            )
        return None

    async def subscribe(self, consumer: str, topics: Sequence[str]) -> NatsSubscription:
        js = self._jetstream()
        if isinstance(topics, str) or not topics:
            raise ValueError(f"topics must be a non-empty sequence of topic names: {topics!r}")
        pulls: list[tuple[str, JetStreamContext.PullSubscription]] = []
        for topic in dict.fromkeys(topics):
            durable = self.consumer_name(consumer, topic)
            config = api.ConsumerConfig(
                name=durable,
                durable_name=durable,
                description=f"storno consumer {consumer!r} of topic {topic!r}",
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_deliver=self.max_deliver,
                filter_subject=self.subject(topic),
            )
            await js.add_consumer(self.stream, config)  # creates it, or updates ack_wait & co.
            pulls.append((topic, await js.pull_subscribe_bind(durable=durable, stream=self.stream)))
        subscription = NatsSubscription(
            pulls, batch=self.batch, on_close=self._subscriptions.discard
        )
        self._subscriptions.add(subscription)
        return subscription

    async def _on_disconnected(self) -> None:
        if self._nc is not None:  # not closing
            log.warning("NATS: disconnected, reconnecting")

    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("NatsBroker is not connected: call connect() first")
        return self._js


class NatsReceived:
    """A message a :class:`NatsSubscription` delivered; ``raw`` is nats-py's own."""

    __slots__ = ("_subscription", "message", "raw")

    def __init__(self, raw: Msg, message: EventMessage, subscription: NatsSubscription) -> None:
        self.raw = raw
        self.message = message
        self._subscription = subscription

    @property
    def deliveries(self) -> int:
        return self.raw.metadata.num_delivered

    async def ack(self) -> None:
        await self.raw.ack()
        self._subscription._unsettled.discard(self)

    async def nak(self, delay: float | None = None) -> None:
        await self.raw.nak(delay=delay)
        self._subscription._unsettled.discard(self)


class NatsSubscription:
    """The messages of one consumer's pull consumers, a batch at a time, in one iterator.

    A message without storno's headers (something else published on the subject) is logged
    and *terminated*, not acked: JetStream stops delivering it but keeps it in the stream and
    announces it (``$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED``), so it is visible rather than
    counted as handled. ``close()`` naks what it fetched but had not acknowledged, so those
    messages come back at once instead of after ``ack_wait``; holding such messages, it first
    waits (up to a second) for its pull requests to expire on the server: nats-server 2.9 hands a
    nakked message to a request whose inbox is gone, then counts that delivery back down, and
    the next consumer would see ``deliveries == 1``.
    """

    def __init__(
        self,
        pulls: Sequence[tuple[str, JetStreamContext.PullSubscription]],
        *,
        batch: int,
        on_close: Callable[[NatsSubscription], None] | None = None,
    ) -> None:
        self._pulls = list(pulls)
        self._batch = batch
        self._on_close = on_close
        self._queue: asyncio.Queue[NatsReceived | None] = asyncio.Queue(maxsize=batch)
        self._unsettled: set[NatsReceived] = set()
        self._stranded: list[Msg] = []  # fetched by a pump when close() stopped it
        self._pumps: list[asyncio.Task[None]] = []
        self._failure: BaseException | None = None
        self._closed = False
        self._requests_expire = 0.0  # loop time by which every pull request sent has expired

    def __aiter__(self) -> AsyncIterator[NatsReceived]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[NatsReceived]:
        if not self._pumps and not self._closed:
            self._pumps = [asyncio.create_task(self._pump(t, p)) for t, p in self._pulls]
        while not self._closed:
            received = await self._queue.get()
            if received is None:
                break
            self._unsettled.add(received)
            yield received
        if self._failure is not None:
            raise self._failure

    async def _pump(self, topic: str, pull: JetStreamContext.PullSubscription) -> None:
        try:
            while True:
                loop = asyncio.get_running_loop()
                self._requests_expire = max(self._requests_expire, loop.time() + _FETCH_WAIT)
                try:
                    batch = await pull.fetch(self._batch, timeout=_FETCH_WAIT)
                except TimeoutError:  # nothing yet (or reconnecting: the request was buffered)
                    continue
                except nats.errors.ConnectionClosedError:
                    raise
                except nats.errors.Error as exc:
                    log.warning("NATS fetch for %s failed, retrying: %r", topic, exc)
                    await asyncio.sleep(_RETRY_PAUSE)
                    continue
                await self._hand_over(topic, batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._closed:
                self._failure = exc
                await self._queue.put(None)

    async def _hand_over(self, topic: str, batch: list[Msg]) -> None:
        for i, raw in enumerate(batch):
            try:
                received = await self._wrap(topic, raw)
                if received is not None:
                    await self._queue.put(received)
            except asyncio.CancelledError:
                self._stranded += batch[i:]
                raise

    async def _wrap(self, topic: str, raw: Msg) -> NatsReceived | None:
        headers = {k: v for k, v in (raw.headers or {}).items() if not k.startswith("Nats-")}
        try:
            message = EventMessage.from_wire(headers, raw.data, topic=topic)
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning(
                "terminated a message on %s that storno cannot read (stream sequence %s): %s",
                raw.subject,
                raw.metadata.sequence.stream,
                exc,
            )
            with contextlib.suppress(Exception):  # if it fails, the message comes again
                await raw.term()
            return None
        return NatsReceived(raw, message, self)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for _, pull in self._pulls:
            with contextlib.suppress(Exception):
                await pull.unsubscribe()
        buffered = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        held = [r.raw for r in [*buffered, *self._unsettled] if r is not None] + self._stranded
        self._unsettled.clear()
        if held:
            # See the class docstring: no request of ours may be open when the naks arrive.
            wait = self._requests_expire + 0.05 - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)
            for raw in held:
                with contextlib.suppress(Exception):  # else it comes again after ack_wait
                    await raw.nak()
        self._queue.put_nowait(None)  # wakes an iterator waiting for the next message
        if self._on_close is not None:
            self._on_close(self)


def _clean(name: str) -> str:
    return _NOT_IN_NAMES.sub("_", name).strip("_") or "_"


def _has_wildcard(subject: str) -> bool:
    return any(c in subject for c in "*> \t")


async def _on_error(exc: Exception) -> None:
    log.warning("NATS: %s", exc or type(exc).__name__)


async def _on_reconnected() -> None:
    log.info("NATS: reconnected")
