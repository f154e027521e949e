"""Waiting for a run's result over real HTTP on loopback: ``wait`` on the start and
``GET /api/v1/runs/{id}/result?wait=N``, woken by the run ending here or, for a run another
process executes, by reading the store with a growing interval; bounded and validated."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import storno
from test_http import error_of
from test_server_support import READ_TOKEN, SAGAS, WEBHOOK_TOKEN, serving, wait_until


def in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``call`` in a thread; its answer (or error) lands in the returned dict."""
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["answer"] = call()
        except BaseException as exc:  # handed to the test's thread
            out["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


def joined(thread: threading.Thread, out: dict[str, Any], timeout: float = 10) -> Any:
    thread.join(timeout)
    assert not thread.is_alive(), "the waiting request did not come back"
    if "error" in out:
        raise out["error"]
    return out["answer"]


def test_start_waits_for_the_result_and_the_result_endpoint_waits(db_url: str):
    with serving(db_url) as s, s.client() as c:
        done = c.post("/api/v1/runs", json={"saga": "lodging", "args": ["ada"], "wait": 10})
        assert done.status_code == 201, done.text
        body = done.json()
        assert body["created"] is True and body["ended"] is True
        assert body["run"]["status"] == "completed" and body["run"]["result"] == "slot for ada"

        failed = c.post(
            "/api/v1/runs",
            json={"saga": "booking", "args": ["bo", 5], "kwargs": {"fail": True}, "wait": 10},
        ).json()
        assert failed["ended"] is True and failed["run"]["status"] == "compensated"
        result = c.get(f"/api/v1/runs/{failed['run']['id']}/result").json()
        assert result["status"] == "compensated" and result["ended"] is True
        assert result["result"] is None and "403" in result["error"]["message"]

        # A run waiting for a signal: the wait runs out with its status, not an error.
        ship = c.post("/api/v1/runs", json={"saga": "shipment", "wait": 0.2}).json()
        assert ship["ended"] is False and ship["run"]["status"] in ("running", "waiting")
        run_id = ship["run"]["id"]
        t0 = time.monotonic()
        pending = c.get(f"/api/v1/runs/{run_id}/result", params={"wait": 0.3})
        assert pending.status_code == 200 and time.monotonic() - t0 >= 0.3
        assert pending.json() == {
            "run_id": run_id,
            "saga": "shipment",
            "status": "waiting",
            "ended": False,
            "result": None,
            "error": None,
        }
        # A long-poll comes back as soon as the signal ends the run, long before its wait.
        with s.client(READ_TOKEN) as reader:
            thread, out = in_thread(
                lambda: reader.get(f"/api/v1/runs/{run_id}/result", params={"wait": 30}, timeout=40)
            )
            wait_until(lambda: s.api.state.server.waiters.taken == 1, what="a waiter")
            t0 = time.monotonic()
            signal = {"data": {"label": "L-1"}}
            assert c.post(f"/api/v1/runs/{run_id}/signals/label_ready", json=signal).is_success
            answer = joined(thread, out)
        assert time.monotonic() - t0 < 5
        assert answer.status_code == 200 and answer.json()["result"] == {"label": "L-1"}
        assert s.api.state.server.waiters.taken == 0


def test_wait_is_validated_and_bounded(db_url: str):
    with serving(db_url, max_waiters=1) as s, s.client() as c:
        for bad in ("-1", "61", "soon"):
            error_of(c.get("/api/v1/runs/x/result", params={"wait": bad}), 422, "validation_error")
        error_of(c.get("/api/v1/runs/nobody/result", params={"wait": 1}), 404, "run_not_found")
        error_of(c.get("/api/v1/runs/x/result", params={"wiat": 1}), 422, "unknown_parameter")
        refused = c.post("/api/v1/runs", json={"saga": "lodging", "run_id": "w-1", "wait": 100})
        error_of(refused, 422, "validation_error")
        error_of(c.get("/api/v1/runs/w-1"), 404, "run_not_found")
        with s.client(WEBHOOK_TOKEN) as hook:
            error_of(hook.get("/api/v1/runs/x/result"), 403, "forbidden")

        run_id = c.post("/api/v1/runs", json={"saga": "shipment"}).json()["run"]["id"]
        thread, out = in_thread(
            lambda: c.get(f"/api/v1/runs/{run_id}/result", params={"wait": 30}, timeout=40)
        )
        wait_until(lambda: s.api.state.server.waiters.taken == 1, what="a waiter")
        busy = c.get(f"/api/v1/runs/{run_id}/result", params={"wait": 1})
        error_of(busy, 429, "too_many_waiters")
        assert busy.headers["retry-after"] == "1"
        # Without wait the answer comes at once, and a refused start creates nothing.
        assert c.get(f"/api/v1/runs/{run_id}/result").json()["status"] == "waiting"
        late = {"saga": "lodging", "args": ["cy"], "run_id": "w-2", "wait": 5}
        error_of(c.post("/api/v1/runs", json=late), 429, "too_many_waiters")
        error_of(c.get("/api/v1/runs/w-2"), 404, "run_not_found")
        c.post(f"/api/v1/runs/{run_id}/signals/label_ready", json={"data": 1})
        assert joined(thread, out).json()["ended"] is True


def test_a_run_executed_by_another_process_is_found_by_reading(db_url: str):
    """The server executes nothing: a worker of another application instance (another
    process, as far as the server can tell) ends the run, and the long-poll reads it."""
    with serving(db_url, worker=False) as s, s.client() as c:
        started = c.post("/api/v1/runs", json={"saga": "lodging", "args": ["di"], "wait": 0.1})
        assert started.json()["ended"] is False and started.json()["run"]["status"] == "pending"
        run_id = started.json()["run"]["id"]
        thread, out = in_thread(
            lambda: c.get(f"/api/v1/runs/{run_id}/result", params={"wait": 30}, timeout=40)
        )
        wait_until(lambda: s.api.state.server.waiters.taken == 1, what="a waiter")

        async def elsewhere() -> None:
            async with storno.Storno(db_url, sagas=SAGAS) as other, other.worker():
                await other.get_handle(run_id).result(timeout=20)

        asyncio.run(elsewhere())
        t0 = time.monotonic()
        answer = joined(thread, out).json()
        assert answer["ended"] is True and answer["result"] == "slot for di"
        assert time.monotonic() - t0 < 2  # the read interval is at most 0.5 s


async def test_a_wait_on_a_run_executing_here_does_not_read_the_store(tmp_path: Any):
    gate = asyncio.Event()

    @storno.step(kind="retryable")
    async def slow(ctx: storno.StepContext) -> str:
        await gate.wait()
        return "done"

    @storno.saga
    async def gated(ctx: storno.SagaContext) -> str:
        return await ctx.step(slow)

    async with storno.Storno(f"sqlite:///{tmp_path / 'w.db'}", sagas=[gated]) as app:
        async with app.worker():
            handle = await app.start(gated)
            reads = 0
            real = app.store.get_run

            async def counted(run_id: str) -> Any:
                nonlocal reads
                reads += 1
                return await real(run_id)

            app.store.get_run = counted  # type: ignore[method-assign]
            waiting = asyncio.ensure_future(app.get_handle(handle.run_id).wait(10))
            await asyncio.sleep(0.3)  # the wait must sit still meanwhile
            assert not waiting.done()
            gate.set()
            record = await asyncio.wait_for(waiting, 5)
        assert record.status is storno.RunStatus.COMPLETED
        assert reads <= 2, f"{reads} reads of the run while it executed here"
