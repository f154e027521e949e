"""What the event tests share: a NATS stream of their own, its reader, and outbox helpers."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest


def nats_url() -> str:
    """The test NATS server (skips, naming the variable, where it is unset; mark the test
    ``nats`` so that ``--require-brokers`` fails instead)."""
    from conftest import broker_url

    return broker_url("nats")


@asynccontextmanager
async def nats_stream(max_msg_size: int | None = None) -> AsyncIterator[tuple[str, str, str]]:
    """A JetStream stream of its own, deleted afterwards: (url, stream name, subject prefix)."""
    import nats
    from nats.js.api import StreamConfig

    url = nats_url()
    name = f"t{uuid.uuid4().hex[:12]}"
    prefix = f"{name}."
    nc = await nats.connect(url)
    js = nc.jetstream()
    config = StreamConfig(name=name, subjects=[f"{prefix}>"], duplicate_window=120.0)
    if max_msg_size is not None:
        config.max_msg_size = max_msg_size
    await js.add_stream(config)
    try:
        yield url, name, prefix
    finally:
        try:
            await js.delete_stream(name)
        finally:
            await nc.close()


async def stream_messages(url: str, stream: str) -> list[dict[str, Any]]:
    """Every message the stream holds, in stream order: headers and data."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except Exception:  # deleted
                continue
            out.append(
                {"headers": dict(msg.headers or {}), "data": json.loads(msg.data or b"null")}
            )
        return out
    finally:
        await nc.close()


async def wait_until(predicate: Any, *, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll an (async) predicate until it holds, or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def raw_insert(url: str, event_id: str, topic: str, key: str | None, payload: Any) -> None:
    """An outbox row written behind storno's back: no notification reaches any relay."""
    import time

    values = (event_id, topic, key, json.dumps(payload), "{}", event_id, time.time(), time.time())
    sql = (
        "INSERT INTO {t} (event_id, topic, key, payload, headers, correlation_id, created_at,"
        " available_at) VALUES ({p})"
    )
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as conn:
            conn.execute(sql.format(t="storno_outbox", p=",".join("?" * 8)), values)
        return
    from conftest import pg_execute

    schema = url.rsplit("schema=", 1)[1].split("&")[0]
    pg_execute(url, sql.format(t=f'"{schema}".storno_outbox', p=",".join(["%s"] * 8)), values)
