"""The pytest plugin (registered as ``storno`` under ``pytest11``): fixtures for tests of
sagas.

- ``storno_clock``: a :class:`~storno.testing.VirtualClock`.
- ``storno_app``: an opened :class:`storno.Storno` on a fresh SQLite file in ``tmp_path``,
  timed by ``storno_clock``, with a running worker; closed after the test. Needs
  pytest-asyncio (async fixture).
- ``storno_faults``: a :class:`~storno.testing.FaultInjector`, installed for the test only.
"""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

import storno
from storno.testing._clock import VirtualClock
from storno.testing._inject import FaultInjector

__all__ = ["storno_app", "storno_clock", "storno_faults"]

F = TypeVar("F", bound=Callable[..., Any])


def _tidy_package_namespace() -> None:
    """pytest rewrites the asserts of every module in the package of an installed plugin, and
    leaves two helper names (``@py_builtins``, ``@pytest_ar``) in each module it rewrote.
    The top-level ``storno`` package has no assert of its own, so they are dropped there:
    ``vars(storno)`` stays what storno defines."""
    helpers = ("@py_builtins", "@pytest_ar")
    namespace = vars(storno)
    if not any(name in namespace for name in helpers) or storno.__file__ is None:
        return
    tree = ast.parse(Path(storno.__file__).read_text(encoding="utf-8"))
    if any(isinstance(node, ast.Assert) for node in ast.walk(tree)):
        return  # its rewritten asserts need the helpers
    for name in helpers:
        namespace.pop(name, None)


_tidy_package_namespace()


@pytest.fixture
def storno_clock() -> VirtualClock:
    """A virtual clock starting at the real time: it moves only when the engine sleeps or
    the test advances it."""
    return VirtualClock()


@pytest.fixture
def storno_faults() -> Iterator[FaultInjector]:
    """A fault injector installed for this test and removed after it."""
    with FaultInjector() as faults:
        yield faults


def _async_fixture(fn: F) -> F:
    """``pytest_asyncio.fixture`` where pytest-asyncio is installed (in strict and auto
    mode alike); without it pytest reports that the async fixture has no plugin."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - exercised only without pytest-asyncio
        return cast(F, pytest.fixture(fn))
    return cast(F, pytest_asyncio.fixture(fn))


@_async_fixture
async def storno_app(tmp_path: Path, storno_clock: VirtualClock) -> AsyncIterator[storno.Storno]:
    """An opened app on a fresh SQLite file in ``tmp_path``, timed by ``storno_clock``, with
    a running worker (id ``storno-test-worker``); closed after the test. Sagas started on it
    are registered on the way; register the steps a resumed compensation must find with
    ``storno_app.register(step)``."""
    app = storno.Storno(f"sqlite:///{tmp_path / 'storno-test.db'}", clock=storno_clock)
    async with app:
        await app.worker(worker_id="storno-test-worker", poll_interval=0.05).start()
        yield app
