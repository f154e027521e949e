"""Sagas, tokens and a loopback server shared by the server tests; and unit tests of the
server's small parts (tokens, durations, stuck rules) that need no server.

``serving(...)`` runs the real ASGI application under uvicorn in a thread, on a free port
of 127.0.0.1, against the test's own database, with a worker in the same process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import storno

pytest.importorskip("fastapi", reason="the server tests need the storno[server] extra")

import httpx
import uvicorn

from storno._server._auth import Principal, Role, TokenStore
from storno.server import create_app, trace_headers

OPERATOR_TOKEN = "op-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"
WEBHOOK_TOKEN = "hook-token-0123456789abcdef"

# --- sagas the served application runs ------------------------------------------------------

PROVIDER: dict[str, str] = {}  # a payment provider that stores charges by idempotency key
REFUND_API = {"down": False}
LOST_ANSWER: set[str] = set()  # run ids whose charge answer is lost once


def find_charge(ctx: storno.StepContext, customer: str, amount: int) -> object:
    return PROVIDER.get(ctx.idempotency_key, storno.NOT_APPLIED)


@storno.step(kind="compensable", verify=find_charge)
def charge_card(ctx: storno.StepContext, customer: str, amount: int) -> str:
    PROVIDER[ctx.idempotency_key] = f"ch-{amount}"
    if ctx.run_id not in LOST_ANSWER:
        LOST_ANSWER.add(ctx.run_id)
        raise storno.OutcomeUnknownError("connection reset before the answer arrived")
    return f"ch-{amount}"


@charge_card.compensation
def refund_card(ctx: storno.CompensationContext[str], customer: str, amount: int) -> None:
    if REFUND_API["down"]:
        raise storno.TerminalError("refund API is down")


TRACE_HEADERS: dict[str, dict[str, str]] = {}  # what step code would send along, by run


@storno.step(kind="compensable")
def book_slot(ctx: storno.StepContext, customer: str) -> str:
    TRACE_HEADERS[ctx.run_id] = trace_headers(ctx)
    return f"slot for {customer}"


@book_slot.compensation
def release_slot(ctx: storno.CompensationContext[str], customer: str) -> None:
    return None


@storno.step(kind="compensable")
def send_sms(ctx: storno.StepContext, text: str) -> str:
    return "sms-1"


@send_sms.compensation
def send_apology(ctx: storno.CompensationContext[str], text: str) -> None:
    return None


@storno.step(kind="compensable", compensate=lambda ctx, fail: None)
def sync_calendar(ctx: storno.StepContext, fail: bool) -> str:
    if fail:
        raise storno.TerminalError("calendar api refused: 403 insufficient scope")
    return "cal-1"


@storno.saga
async def booking(ctx: storno.SagaContext, customer: str, amount: int, fail: bool = False) -> str:
    await ctx.step(book_slot, customer)
    charge = await ctx.step(charge_card, customer, amount)
    await ctx.step(send_sms, f"<b>booked</b> for {customer}")
    await ctx.step(sync_calendar, fail)
    return charge


@storno.saga
async def approval(ctx: storno.SagaContext, amount: int) -> str:
    ctx.publish("phase", "waiting for a manager")
    decision = await ctx.wait_for_approval()
    return f"approved by {decision.by}"


@storno.saga
async def shipment(ctx: storno.SagaContext) -> Any:
    return await ctx.wait_for_signal("label_ready")


@storno.saga
async def lodging(ctx: storno.SagaContext, guest: str) -> str:
    return await ctx.step(book_slot, guest)


@storno.saga(stuck_after=60)
async def conference(ctx: storno.SagaContext, guests: list[str]) -> list[str]:
    return await ctx.gather(*(ctx.child(lodging, g) for g in guests))


NOTICE_API = {"down": False}


@storno.step(
    kind="noncompensable", retry=storno.RetryPolicy(initial_interval=0.01, maximum_attempts=2)
)
def post_notice(ctx: storno.StepContext, text: str) -> str:
    if NOTICE_API["down"]:
        raise storno.OutcomeUnknownError("read timeout: was the notice posted?")
    return "notice-1"


@storno.saga
async def announce(ctx: storno.SagaContext, customer: str) -> str:
    """A booking announced in a channel: the notice cannot be taken back."""
    await ctx.step(book_slot, customer)
    return await ctx.step(post_notice, f"booked for {customer}")


SAGAS = [booking, approval, shipment, lodging, conference, announce]


@storno.saga
async def orphan(ctx: storno.SagaContext) -> None:
    """A saga the served application does not know: its runs wait for another worker."""


# --- a server on loopback ---------------------------------------------------------------------


def tokens() -> TokenStore:
    store = TokenStore()
    store.add(OPERATOR_TOKEN, Role.OPERATE, "ops-alice")
    store.add(READ_TOKEN, Role.READ, "viewer")
    store.add(WEBHOOK_TOKEN, Role.WEBHOOK, "psp")
    return store


@dataclass
class Served:
    url: str
    app: storno.Storno
    api: Any

    def client(self, token: str | None = OPERATOR_TOKEN, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10, **kw)


@contextlib.contextmanager
def serving(
    db_url: str,
    *,
    token_store: TokenStore | None = None,
    app_options: dict[str, Any] | None = None,
    extra_sagas: tuple[Any, ...] = (),
    **options: Any,
) -> Iterator[Served]:
    """The server on a free loopback port, with a worker, until the block ends."""
    PROVIDER.clear()
    LOST_ANSWER.clear()
    sagas = [*SAGAS, *extra_sagas]
    app = storno.Storno(db_url, sagas=sagas, steps=[book_slot, send_sms], **(app_options or {}))
    options.setdefault("worker", True)
    options.setdefault("worker_options", {"poll_interval": 0.05})
    options.setdefault("stats_ttl", 0)
    api = create_app(app, tokens=token_store or tokens(), **options)
    config = uvicorn.Config(
        api, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served(f"http://127.0.0.1:{port}", app, api)
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def wait_until(check: Callable[[], Any], *, timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


def run_status(client: httpx.Client, run_id: str) -> str:
    response = client.get(f"/api/v1/runs/{run_id}")
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


def wait_status(client: httpx.Client, run_id: str, *statuses: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/api/v1/runs/{run_id}").json()
        return body if body.get("status") in statuses else None

    result: dict[str, Any] = wait_until(ended, what=f"run {run_id} in {statuses}")
    return result


def start(client: httpx.Client, saga: str, *args: Any, run_id: str | None = None) -> str:
    body: dict[str, Any] = {"saga": saga, "args": list(args)}
    if run_id:
        body["run_id"] = run_id
    response = client.post("/api/v1/runs", json=body)
    assert response.status_code in (200, 201), response.text
    return str(response.json()["run"]["id"])


class PastClock:
    """A clock ``offset`` seconds behind: runs made with it look old to the server."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() - self.offset

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def make_old_run(db_url: str, saga: str, run_id: str, age: float, **options: Any) -> None:
    """A pending run created ``age`` seconds ago, by a process with no worker."""

    async def go() -> None:
        known = {s.name: s for s in [*SAGAS, orphan]}
        args = options.pop("args", [])
        async with storno.Storno(db_url, clock=PastClock(age)) as app:
            await app.start(known[saga].options(run_id=run_id, **options), *args)

    asyncio.run(go())


# --- unit tests of the small parts ------------------------------------------------------------


def test_tokens_from_env_and_file(tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text(f"# role name token\noperate alice {OPERATOR_TOKEN}\nread bob {READ_TOKEN}\n")
    store = TokenStore.from_sources(
        env={"STORNO_WEBHOOK_TOKENS": f"psp:{WEBHOOK_TOKEN}"}, files=[path]
    )
    assert store.check(OPERATOR_TOKEN) == Principal("alice", Role.OPERATE)
    assert store.check(READ_TOKEN).role is Role.READ  # type: ignore[union-attr]
    assert store.check(WEBHOOK_TOKEN).name == "psp"  # type: ignore[union-attr]
    assert store.check("nope-nope-nope-nope") is None
    assert store.check(None) is None
    assert OPERATOR_TOKEN not in repr(store)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("operate alice short", "at least 16"),
        ("admin alice 0123456789abcdef0123", "unknown role 'admin'"),
        ("operate alice", "expected `ROLE NAME TOKEN`"),
        (f"operate a {OPERATOR_TOKEN}\nread b {OPERATOR_TOKEN}", "must be distinct"),
    ],
)
def test_bad_tokens_file_is_refused(tmp_path: Path, text: str, message: str):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(storno.ConfigurationError, match=message):
        TokenStore.from_sources(env={}, files=[path])


def test_durations():
    from storno._model import parse_duration

    assert parse_duration("90") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2d") == 172800
    for bad in ("", "soon", "5 parsecs", "0s", "-1h"):
        with pytest.raises(ValueError, match="duration|longer than zero"):
            parse_duration(bad)


def test_loopback_rule():
    from storno._server._auth import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert not is_loopback("example.com")


def test_stuck_rule():
    from storno._stuck import stuck_reason
    from storno._views import RunInfo

    def run(status: str, updated: float, wake: float | None = None) -> RunInfo:
        return RunInfo(
            "r", "s", storno.RunStatus(status), 0, updated, None, {}, None, None, None, wake_at=wake
        )

    now = 10_000.0
    assert stuck_reason(run("running", now - 50), now, 60) is None
    assert "running" in (stuck_reason(run("running", now - 61), now, 60) or "")
    assert stuck_reason(run("waiting", now - 5000, wake=now + 10), now, 60) is None
    assert "past its wake time" in (stuck_reason(run("waiting", 0, wake=now - 100), now, 60) or "")
    assert stuck_reason(run("waiting", 0, wake=now - 30), now, 60) is None  # just came due
    assert stuck_reason(run("pending", 0, wake=now + 1), now, 60) is None  # scheduled
    for ended in ("completed", "compensated", "compensation_failed", "needs_attention"):
        assert stuck_reason(run(ended, 0), now, 60) is None
    assert stuck_reason(run("running", now - 30), now, 3600, fixed=10) is not None


def serve_app() -> storno.Storno:
    """The application ``storno serve --app test_server_support:serve_app`` serves."""
    return storno.Storno(sagas=SAGAS, steps=[book_slot, send_sms])


def test_text_logs_escape_control_characters_so_no_line_can_be_forged() -> None:
    import io
    import logging

    from storno._model import Event, EventType, RunRecord, RunStatus
    from storno._server._logging import EventLog, TextFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("test.forged")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    forged = "2030-01-01 00:00:00,000 INFO storno ok"
    record = RunRecord("r\n1", f"saga\r{forged}", RunStatus.RUNNING, "{}", 0.0, 0.0)
    error = {"type": "TerminalError", "message": f"refused\n{forged}\x1b[2J\u2028{forged}"}
    event = Event(3, EventType.STEP_FAILED, 0.0, 1, {"step": f"s\n{forged}", "error": error})
    EventLog(logger)(record, [event])
    logger.info("argument %s", f"x\n{forged}")
    try:
        raise ValueError(f"boom\n{forged}")
    except ValueError:
        logger.exception("failed")
    lines = stream.getvalue().splitlines()
    assert not [line for line in lines if line.startswith(forged[:19])], lines
    assert "refused\\n2030" in lines[0] and "\\x1b[2J\\u2028" in lines[0]
    assert "step=s\\n2030" in lines[0] and "run_id=r\\n1" in lines[0]
    assert lines[1].endswith("argument x\\n2030-01-01 00:00:00,000 INFO storno ok")
    assert all(line.startswith("    ") for line in lines[3:])  # the traceback, indented


def test_the_event_log_names_an_emitted_event_by_topic_and_id(caplog):
    import logging

    from storno._model import Event, EventType, RunRecord, RunStatus
    from storno._server._logging import EventLog

    record = RunRecord("r1", "book", RunStatus.RUNNING, "{}", 0.0, 0.0)
    data = {"topic": "slot.held", "event_id": "r1/2", "key": "A7"}
    with caplog.at_level("INFO", logger="test.emitted"):
        EventLog(logging.getLogger("test.emitted"))(
            record, [Event(4, EventType.EVENT_EMITTED, 0.0, 2, data, "{}")]
        )
    [line] = caplog.records
    assert line.getMessage() == "event emitted: slot.held as r1/2"
    assert line.step == "emit:slot.held"
