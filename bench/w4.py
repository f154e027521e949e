"""W4: the 4-step saga started over the network by 32 concurrent clients, each waiting for
its result; sagas/s and start-to-result p50/p99.

The driver (this process) is the same for every system: ``clients`` coroutines, each
starting one saga and waiting for its result, then the next, over one connection pool. The
server is always another process: ``storno serve --worker`` (its embedded worker executes
the runs), Restate's server with its service deployment, Temporal's dev server with a worker
process (Temporal's client starts the workflow and awaits its result). storno and Restate
are driven over HTTP with the same httpx client: one ``POST`` per saga that answers with the
result (storno's ``"wait"`` on the start, Restate's ingress call). DBOS has no HTTP ingress of
its own, so it has no W4.

Also the application ``storno serve`` loads (``bench.w4:app``): bench/storno_app.py's sagas
on ``$STORNO_URL``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import common

CLIENTS = 32
EXPECTED = ["slot", "charge", "sms", "calendar"]
UNSUPPORTED = {
    "dbos-sqlite": "DBOS has no HTTP ingress of its own",
    "dbos-postgres": "DBOS has no HTTP ingress of its own",
}


async def drive(call: Callable[[], Awaitable[Any]], n: int, clients: int) -> dict[str, Any]:
    """``n`` sagas, ``clients`` at a time; each ``call()`` starts one and returns its result.
    Returns sagas/s and the start-to-result latencies' percentiles."""
    remaining = n
    took: list[float] = []
    start = time.perf_counter()

    async def client() -> None:
        nonlocal remaining
        while remaining > 0 and not (took and common._capped(start)):
            remaining -= 1
            t0 = time.perf_counter()
            result = await call()
            took.append(time.perf_counter() - t0)
            if result != EXPECTED:
                raise AssertionError(f"a W4 saga answered {result!r}, not {EXPECTED!r}")

    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    return {
        "sagas_per_s": len(took) / elapsed,
        **common.percentiles_ms(took),
        "capped": len(took) < n,
        "clients": clients,
    }


async def measure(
    call: Callable[[], Awaitable[Any]], n: int, clients: int, warmup: int
) -> dict[str, Any]:
    await drive(call, warmup, clients)
    return await drive(call, n, clients)


# --- storno: `storno serve` in a process of its own ------------------------------------------


def app() -> Any:
    """The application ``storno serve --app bench.w4:app`` loads: bench/storno_app.py's
    sagas, on ``$STORNO_URL``."""
    import storno
    from bench.storno_app import SAGAS

    return storno.Storno(sagas=SAGAS)


class StornoServer:
    """``storno serve --worker`` on a free loopback port, on the round's database."""

    def __init__(self, url: str, folder: Path, concurrency: int = 64) -> None:
        self.port = common.free_port()
        self.log = folder / "storno-serve.log"
        self._log = self.log.open("wb")
        cmd = [sys.executable, "-m", "storno", "serve", "--app", "bench.w4:app", "--worker"]
        cmd += ["--concurrency", str(concurrency), "--port", str(self.port), "--insecure-open"]
        env = common.child_env(STORNO_URL=url)
        env.pop("STORNO_API_TOKENS", None)
        env.pop("STORNO_API_READ_TOKENS", None)
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=self._log, env=env, cwd=common.ROOT
        )
        common.wait_port(self.port, 60, self.proc)

    def stop(self) -> None:
        common.stop_process(self.proc, timeout=20)
        self._log.close()


async def storno_w4(system: str, n: int, clients: int, warmup: int) -> dict[str, Any]:
    import httpx

    from bench.storno_app import Database

    with tempfile.TemporaryDirectory(prefix="bench-w4-") as tmp:
        db = Database(system, Path(tmp))
        server = StornoServer(db.url, Path(tmp))
        try:
            limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{server.port}", timeout=120, limits=limits
            ) as http:
                body = {"saga": "booking", "args": [False], "wait": 60}

                async def one() -> Any:
                    response = await http.post("/api/v1/runs", json=body)
                    if response.status_code != 201:
                        raise RuntimeError(f"start answered {response.status_code}")
                    answer = response.json()
                    if not answer["ended"]:
                        raise RuntimeError(f"run {answer['run']['id']} did not end in 60 s")
                    return answer["run"]["result"]

                result = await measure(one, n, clients, warmup)
        finally:
            server.stop()
            db.drop()
    return {**result, "via": "POST /api/v1/runs with wait (one request per saga)"}


def run(system: str, params: dict[str, Any]) -> dict[str, Any]:
    """One W4 round on ``system`` (bench/child.py calls this)."""
    n, clients = int(params["n"]), int(params.get("clients", CLIENTS))
    warmup = int(params.get("warmup", 20))
    if system in UNSUPPORTED:
        raise ValueError(f"W4 is not measured on {system}: {UNSUPPORTED[system]}")
    if system.startswith("storno"):
        return dict(asyncio.run(storno_w4(system, n, clients, warmup)))
    if system == "restate":
        from bench.peers import restate_app

        return dict(asyncio.run(restate_app.w4(system, n, clients, warmup)))
    from bench.peers import temporal_app

    return dict(asyncio.run(temporal_app.w4(system, n, clients, warmup)))


if __name__ == "__main__":  # pragma: no cover - a manual check: python -m bench.w4 SYSTEM N
    os.environ.setdefault("BENCH_TIME_CAP", "60")
    print(run(sys.argv[1], {"n": int(sys.argv[2]) if len(sys.argv) > 2 else 500}))
