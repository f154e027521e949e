"""Values a run could not show later are refused before anything is written.

A run must stay readable for as long as it is kept: its times must be dates a reader can
print (the years 1 to 9999, UTC), its values JSON a reader can parse and render (nested at
most :data:`storno._serde.MAX_DEPTH` levels), its durations finite. ``Storno.start()``,
``signal()``, ``ctx.publish()`` and the durable waits refuse anything else with a message
naming the problem, and the store is left as it was.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

import storno
from conftest import wait_for
from storno._serde import MAX_DEPTH, decode, encode


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@storno.saga
async def takes(ctx: storno.SagaContext, value: Any) -> Any:
    return value


@storno.saga
async def listens(ctx: storno.SagaContext) -> Any:
    return await ctx.wait_for_signal("go")


@storno.saga
async def naps(ctx: storno.SagaContext, seconds: str) -> None:
    await ctx.sleep(float(seconds))  # JSON holds no inf or nan: they come as text


FAR = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(-timedelta(hours=23, minutes=59)))


def test_values_nested_too_deeply_are_refused_by_encode() -> None:
    assert decode(encode(deep(MAX_DEPTH - 1), what="x")) == deep(MAX_DEPTH - 1)
    wide = [{"a": [1, {"b": "[[[[{{{{"}]} for _ in range(500)]  # many brackets, shallow
    assert decode(encode(wide, what="x")) == wide
    with pytest.raises(storno.SerializationError, match=f"nested more than {MAX_DEPTH} levels"):
        encode(deep(MAX_DEPTH + 1), what="input of saga 'takes'")
    with pytest.raises(storno.SerializationError, match="input of saga 'takes'"):
        encode({"k": deep(600)}, what="input of saga 'takes'")


async def test_start_refuses_what_the_run_could_not_show(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[takes, listens]) as app:
        with pytest.raises(storno.SerializationError, match="nested more than"):
            await app.start(takes, deep(300))
        with pytest.raises(storno.ConfigurationError, match="start_at .* out of range"):
            await app.start(takes.options(start_at=FAR), 1)
        with pytest.raises(storno.ConfigurationError, match="deadline .* out of range"):
            await app.start(takes.options(timeout=1e300), 1)
        for bad in (math.nan, math.inf):
            with pytest.raises(storno.ConfigurationError, match="timeout must be"):
                await app.start(takes.options(timeout=bad), 1)
        with pytest.raises(storno.ConfigurationError, match="run_id"):
            await app.start(takes.options(run_id="a\x00b"), 1)
        assert await app.list_runs() == []  # nothing above was stored

        handle = await app.start(listens)
        with pytest.raises(storno.SerializationError, match="nested more than"):
            await app.signal(handle.run_id, "go", deep(200))
        assert await app.store.inbox(handle.run_id) == []
        ok = await app.start(takes.options(start_at=datetime(9999, 1, 1, tzinfo=UTC)), 1)
        assert (await app.describe(ok.run_id)).to_json()["wake_at"].startswith("9999-01-01")


async def test_waits_refuse_times_beyond_the_calendar(db_url: str) -> None:
    async with storno.Storno(db_url, sagas=[naps]) as app, app.worker():
        for seconds in ("1e300", "inf", "nan"):
            handle = await app.start(naps, seconds)
            with pytest.raises(storno.RunFailedError, match="sleep"):
                await handle.result(timeout=5)
        runs = await app.list_runs()
        assert len(runs) == 3
        for run in runs:
            assert (await app.describe(run.run_id)).to_json()  # every run can still be shown

        async def shown() -> bool:
            return all(r.status is storno.RunStatus.COMPENSATED for r in await app.list_runs())

        await wait_for(shown)
