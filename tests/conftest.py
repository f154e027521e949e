"""Shared fixtures: every test gets its own real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import storno


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'storno.db'}"


class Crash(BaseException):
    """Stands for a process dying at a fault point: it escapes the engine's error handling."""


async def wait_for(
    condition: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.01
) -> Any:
    """Poll an async condition until it is truthy; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
async def app(db_url: str) -> AsyncIterator[storno.Storno]:
    async with storno.Storno(db_url) as application:
        yield application


class crash_at:
    """Make the engine 'die' at a fault point: raise :class:`Crash` there, once."""

    def __init__(self, point: str, **match: Any) -> None:
        self.point = point
        self.match = match
        self.fired = 0

    def _hook(self, name: str, details: dict[str, Any]) -> None:
        if self.fired or name != self.point:
            return
        if all(details.get(k) == v for k, v in self.match.items()):
            self.fired += 1
            raise Crash(f"crash at {name} {details}")

    def __enter__(self) -> crash_at:
        from storno import _faults

        self._previous = _faults.set_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        from storno import _faults

        _faults.set_hook(self._previous)
