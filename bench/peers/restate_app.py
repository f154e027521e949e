"""Restate: the server from the npm package ``@restatedev/restate-server`` (installed by
bench/setup_peers.sh under bench/.node-peers), bound to 127.0.0.1, and the services of
``restate_service.py`` served by hypercorn in a process of their own (HTTP/2 cleartext, as
Restate's Python docs serve them). The driver calls the ingress over HTTP, as a client
would: ``POST /Booking/run`` waits for the saga's result.

Each round starts a fresh server on an empty base directory and registers the deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench import common

DURABILITY = {
    "restate": "Restate server defaults: its log (Bifrost, replicated loglet on the local "
    "log-server) and partition store in RocksDB; log-server WAL fsync on "
    "(rocksdb-disable-wal-fsync=false)",
}
INGRESS, ADMIN, NODE = 8080, 9070, 5122


def server_binary() -> Path:
    path = common.ROOT / "bench" / ".node-peers" / "node_modules" / ".bin" / "restate-server"
    if not path.exists():
        raise RuntimeError(
            "the Restate server is not installed: run bench/setup_peers.sh (npm install "
            "@restatedev/restate-server into bench/.node-peers)"
        )
    return path


class Server:
    """restate-server on 127.0.0.1 with an empty base directory."""

    def __init__(self, folder: Path) -> None:
        for port in (INGRESS, ADMIN, NODE):
            try:
                common.wait_port(port, timeout=0.1)
            except RuntimeError:
                continue
            raise RuntimeError(f"port {port} is taken: another Restate server is running?")
        self.folder = folder
        self.log = folder / "restate-server.log"
        self._log = self.log.open("wb")
        env = {
            **os.environ,
            "RESTATE_DISABLE_TELEMETRY": "true",
            "RESTATE_LOG_FILTER": "warn",
        }
        cmd = [str(server_binary()), "--base-dir", str(folder / "restate-data")]
        cmd += ["--bind-ip", "127.0.0.1", "--listen-mode", "tcp", "--no-logo"]
        cmd += ["--node-name", "bench"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, env=env, cwd=folder)
        common.wait_port(INGRESS, 60, self.proc)
        common.wait_port(ADMIN, 60, self.proc)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{ADMIN}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Restate did not become healthy; see {self.log}")
            time.sleep(0.1)

    def register(self, port: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            response = httpx.post(
                f"http://127.0.0.1:{ADMIN}/deployments",
                json={"uri": f"http://127.0.0.1:{port}", "force": True},
                timeout=30,
            )
            if response.status_code in (200, 201):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"registering the deployment failed: {response.text}")
            time.sleep(0.2)

    def stop(self) -> None:
        common.stop_process(self.proc, timeout=20)
        self._log.close()


class Deployment(common.Gate):
    """The services served by hypercorn in a process of their own."""

    def __init__(self, port: int, env: dict[str, str], log: Path) -> None:
        cmd = [sys.executable, "-m", "bench.worker", "bench.peers.restate_app", "serve"]
        super().__init__([*cmd, "--port", str(port)], env, log)
        self.port = port

    def start(self) -> None:
        self.go()
        common.wait_port(self.port, 30, self.proc)


async def _serve(port: int) -> None:
    import hypercorn.asyncio
    from hypercorn.config import Config

    from bench.peers.restate_service import app

    common.gate_wait()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.h2_max_concurrent_streams = 2**31 - 1
    config.keep_alive_timeout = 600
    config.loglevel = "WARNING"
    config.accesslog = None
    await hypercorn.asyncio.serve(app, config)  # type: ignore[arg-type]


def _setup(folder: Path, env: dict[str, str] | None = None) -> tuple[Server, Deployment]:
    server = Server(folder)
    port = common.free_port()
    deployment = Deployment(port, env or common.child_env(), folder / "deployment.log")
    deployment.start()
    server.register(port)
    return server, deployment


@contextlib.asynccontextmanager
async def _running() -> AsyncIterator[tuple[httpx.AsyncClient, Server, Deployment]]:
    """A fresh Restate server with the handlers registered, and a client for its ingress;
    yields (client, server, deployment)."""
    with tempfile.TemporaryDirectory(prefix="bench-restate-") as tmp:
        server, deployment = _setup(Path(tmp))
        try:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{INGRESS}", timeout=120, limits=limits
            ) as http:
                yield http, server, deployment
        finally:
            deployment.stop_now()
            server.stop()


async def _with(system: str, body: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    async with _running() as (http, _, _):
        return await body(http)


class SagaFailed(Exception):
    pass


async def _call(http: httpx.AsyncClient, fail: bool) -> Any:
    response = await http.post("/Booking/run", json={"fail": fail})
    if response.status_code != 200:
        raise SagaFailed(response.text)
    return response.json()


async def w1_seq(system: str, n: int, warmup: int) -> dict[str, Any]:
    async def body(http: httpx.AsyncClient) -> dict[str, Any]:
        async def one() -> None:
            assert await _call(http, False) == ["slot", "charge", "sms", "calendar"]

        await common.run_sequential(one, warmup)
        return common.latency_result(await common.run_sequential(one, n), n)

    result: dict[str, Any] = await _with(system, body)
    return result


async def w1_conc(system: str, n: int, in_flight: int, warmup: int) -> dict[str, Any]:
    async def body(http: httpx.AsyncClient) -> dict[str, Any]:
        async def one() -> None:
            await _call(http, False)

        await common.run_concurrent(one, warmup, in_flight)
        return await common.run_concurrent(one, n, in_flight)

    result: dict[str, Any] = await _with(system, body)
    return result


async def w2_seq(system: str, n: int, warmup: int) -> dict[str, Any]:
    async def body(http: httpx.AsyncClient) -> dict[str, Any]:
        async def one() -> None:
            await _call(http, True)

        await common.run_expecting_failure(one, warmup, (SagaFailed,))
        took = await common.run_expecting_failure(one, n, (SagaFailed,))
        return common.latency_result(took, n)

    result: dict[str, Any] = await _with(system, body)
    return result


async def w4(system: str, n: int, clients: int, warmup: int) -> dict[str, Any]:
    """W4: bench/w4.py's driver calling the ingress, one ``POST /Booking/run`` per saga (the
    call answers with the saga's result)."""
    from bench import w4

    async with _running() as (http, _, _):

        async def one() -> Any:
            return await _call(http, False)

        result = await w4.measure(one, n, clients, warmup)
    return {**result, "via": "POST /Booking/run on the ingress (one request per saga)"}


# --- W3 --------------------------------------------------------------------------------------


def w3(system: str, runs: int, folder: Path) -> dict[str, Any]:
    ledger = folder / "ledger.db"
    common.init_ledger(ledger)
    env = common.child_env(BENCH_LEDGER=str(ledger))
    server, first = _setup(folder, env)
    base = f"http://127.0.0.1:{INGRESS}"
    # The replacement is started (and made ready to serve) before any saga is sent.
    second = Deployment(first.port, env, folder / "deployment-2.log")
    try:
        ids = [f"w3-{i:04d}" for i in range(runs)]
        invocations: dict[str, str] = {}
        with httpx.Client(base_url=base, timeout=60) as http:
            for saga_id in ids:
                response = http.post(
                    "/W3Booking/run/send",
                    json={"id": saga_id},
                    headers={"idempotency-key": saga_id},
                )
                response.raise_for_status()
                invocations[saga_id] = response.json()["invocationId"]
        at_kill = common.kill_when_effects(ledger, runs * len(common.STEP_NAMES) // 2, first)
        t0 = time.perf_counter()
        second.start()

        async def attach_all() -> list[Any]:
            limits = httpx.Limits(max_connections=runs, max_keepalive_connections=runs)
            async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:

                async def attach(invocation: str) -> Any:
                    response = await http.get(f"/restate/invocation/{invocation}/attach")
                    return response.json() if response.status_code == 200 else response.text

                return await asyncio.gather(*(attach(invocations[i]) for i in ids))

        results = asyncio.run(attach_all())
        recovery = time.perf_counter() - t0
    finally:
        for deployment in (first, second):
            if deployment.proc.poll() is None:
                deployment.proc.kill()
                deployment.proc.wait()
        server.stop()
    summary = common.ledger_summary(ledger, runs)
    ok = sum(1 for r in results if r == ["slot", "charge", "sms", "calendar"])
    return {
        "recovery_s": recovery,
        "effects_at_kill": at_kill,
        "completed": ok,
        "ended_exactly_once": ok == runs and summary["missing_effects"] == 0,
        "lease": "none: the server retries an invocation whose deployment went away, with its "
        "default retry policy (first retry after 500 ms, doubling)",
        **summary,
    }


# --- Scale -----------------------------------------------------------------------------------


async def scale(system: str, marks: list[int], wakeups: int, park_limit: float) -> dict[str, Any]:
    async with _running() as (http, server, deployment):

        async def start(workflow: str) -> None:
            (await http.post(f"/Parked/{workflow}/run/send")).raise_for_status()

        async def wake(workflow: str) -> float:
            (await http.post(f"/Parked/{workflow}/wake")).raise_for_status()
            response = await http.get(f"/restate/workflow/Parked/{workflow}/attach")
            response.raise_for_status()
            return float(response.json())

        result = await common.park_then_wake(
            start,
            lambda: _prepared(http),
            wake,
            marks=marks,
            wakeups=wakeups,
            park_limit=park_limit,
            rss=lambda: common.rss_mib(deployment.proc.pid),
            server_rss=lambda: common.tree_rss_mib(server.proc.pid),
            poll=1.0,
        )
        return {
            **result,
            "rss_of": "the hypercorn process serving the handlers; the Restate server's RSS "
            "beside it",
        }


async def _prepared(http: httpx.AsyncClient) -> int:
    """Parked workflows: their run invocation has journaled the promise wait (it is then
    suspended, or still running until the inactivity timeout suspends it)."""
    response = await http.post(
        f"http://127.0.0.1:{ADMIN}/query",
        json={
            "query": "SELECT count(*) AS c FROM sys_invocation WHERE target_service_name ="
            " 'Parked' AND target_handler_name = 'run' AND journal_size >= 3"
        },
        headers={"accept": "application/json"},
    )
    response.raise_for_status()
    rows = response.json().get("rows", [])
    return int(rows[0]["c"]) if rows else 0


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["serve"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("BENCH_LEDGER", "")
    asyncio.run(_serve(args.port))
