"""Long-running commands: ``storno worker`` executes runs, ``storno relay`` sends the outbox
through the application's broker (and nothing else), ``storno serve`` serves the HTTP API,
webhooks, the dashboard and metrics (and executes runs with ``--worker``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from storno._app import Storno
from storno._cli._common import app_for, db_option, duration, load_app, log, point_at
from storno._model import (
    ENDED_STATUSES,
    NEEDS_A_PERSON_STATUSES,
    Event,
    EventType,
    RunRecord,
    RunStatus,
)
from storno._server._logging import configure_logging
from storno._store._migrations import redact
from storno._worker import Worker
from storno.events import Relay

__all__ = ["COMMANDS"]


# --- worker ------------------------------------------------------------------------------

_ENDS = {
    EventType.RUN_COMPLETED: RunStatus.COMPLETED,
    EventType.RUN_COMPENSATED: RunStatus.COMPENSATED,
    EventType.RUN_CANCELLED: RunStatus.CANCELLED,
    EventType.RUN_COMPENSATION_FAILED: RunStatus.COMPENSATION_FAILED,
    EventType.RUN_NEEDS_ATTENTION: RunStatus.NEEDS_ATTENTION,
    EventType.RUN_WAITING: RunStatus.WAITING,
}
"""The events with which an execution lets go of a run, and the status they leave it in."""

# The events that carry the error the store keeps for the run (the engine writes the same
# error with the status change that goes with them).
_ERRORS = {
    EventType.COMPENSATION_STARTED,
    EventType.RUN_COMPENSATION_FAILED,
    EventType.RUN_NEEDS_ATTENTION,
}


class RunLog:
    """Logs each run the worker picks up and how it left it: a listener on the application
    (:meth:`Storno.add_listener`), so it reads only what the worker made durable.

    An execution is one claim of a run (its lease epoch): it is logged as picked up with its
    first durable write, and as ended (or suspended) with the event that ends it. A run that
    ends needing a person (a dead letter, a parked run) is logged at ERROR, as `storno serve`
    logs it, for alerts that watch errors; a compensated run is the saga working as designed.
    """

    def __init__(self) -> None:
        # Executions that hold their run: run id -> (lease epoch, the run's error so far).
        self.open: dict[str, tuple[int, dict[str, Any] | None]] = {}

    def __call__(self, record: RunRecord, events: list[Event]) -> None:
        run_id = record.run_id
        seen = self.open.get(run_id)
        if seen is None or seen[0] != record.epoch:
            log.info("run %s: picked up (saga %s, %s)", run_id, record.saga, record.status)
            seen = (record.epoch, record.error)
        error = seen[1]
        for event in events:
            if event.type in _ERRORS and isinstance(event.data.get("error"), dict):
                error = event.data["error"]
            status = _ENDS.get(event.type)
            if status is None:
                continue
            self.open.pop(run_id, None)
            if status not in ENDED_STATUSES:
                log.info("run %s: left %s, to be resumed", run_id, status.value)
                return
            level = logging.ERROR if status in NEEDS_A_PERSON_STATUSES else logging.INFO
            said = f": {error.get('message')}" if error else ""
            log.log(level, "run %s: %s%s", run_id, status.value, said)
            return
        self.open[run_id] = (record.epoch, error)

    async def handed_back(self, app: Storno, run_ids: list[str]) -> None:
        """Log the runs of ``run_ids`` whose execution stopped holding them without an event
        (a stopping worker hands its leases back), with the status they were left in."""
        for run_id in run_ids:
            if self.open.pop(run_id, None) is None:
                continue  # ended or suspended (logged), or it wrote nothing here
            now = await app.store.get_run(run_id)
            if now is not None and now.status not in ENDED_STATUSES:
                log.info("run %s: left %s, to be resumed", run_id, now.status.value)


async def _work(app: Storno, concurrency: int, worker_id: str | None, poll: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runs = RunLog()
    app.add_listener(runs)
    async with app:
        worker = Worker(app, concurrency=concurrency, poll_interval=poll, worker_id=worker_id)
        await worker.start()
        names = ", ".join(app.saga_names) or "none: it will claim nothing"
        log.info("worker %s started on %s (sagas: %s)", worker.id, redact(app.url), names)
        await stop.wait()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)  # a second signal ends the process at once
        in_flight = worker.active_runs
        log.info("worker %s stopping; %d run(s) in flight", worker.id, len(in_flight))
        await worker.stop()
        await runs.handed_back(app, in_flight)
        log.info("worker %s stopped", worker.id)


@click.command(short_help="Execute runs until SIGINT or SIGTERM.")
@click.option("--app", "app_ref", required=True, metavar="MODULE:ATTR", help="The application.")
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--worker-id", help="Stable id of this worker slot (a pod name); default random.")
@click.option(
    "--poll-interval", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True
)
@db_option
def worker(
    app_ref: str,
    concurrency: int,
    worker_id: str | None,
    poll_interval: float,
    url: str,
) -> None:
    """Execute runs of the application's sagas until SIGINT or SIGTERM.

    MODULE:ATTR names a storno.Storno instance (or a function returning one); the current
    folder is importable. The database is --db, else $STORNO_URL, else the application's
    own; an application whose code names a URL refuses to start when --db or $STORNO_URL
    names another.
    """
    configure_logging("text")  # escapes control characters: a run's text cannot forge lines
    app = load_app(app_ref)
    point_at(app, app_ref, url)
    asyncio.run(_work(app, concurrency, worker_id, poll_interval))


# --- relay -------------------------------------------------------------------------------


async def _relay(app: Storno) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    broker = app.broker
    assert broker is not None
    async with app:
        relay = Relay(app.store, broker, clock=app.clock, **app.relay_options)
        try:
            await relay.start()
        except Exception as exc:
            await relay.stop()
            raise click.ClickException(
                f"the relay could not start on broker {broker.name}: {exc}"
            ) from exc
        try:
            log.info("relay %s started on %s (broker %s)", relay.id, redact(app.url), broker.name)
            await stop.wait()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)  # a second signal ends the process at once
            log.info("relay %s stopping", relay.id)
        finally:
            await relay.stop()  # the batch in hand is finished; claimed rows are handed back
            await broker.close()
        c = relay.counts
        log.info(
            "relay %s stopped: %d sent, %d refused and to be retried, %d dead letters, %d outages",
            relay.id,
            c.sent,
            c.retried,
            c.dead,
            c.outages,
        )


@click.command(short_help="Send the outbox through the app's broker until SIGINT or SIGTERM.")
@click.option("--app", "app_ref", required=True, metavar="MODULE:ATTR", help="The application.")
@db_option
def relay(app_ref: str, url: str) -> None:
    """Send the outbox's committed events through the application's broker until SIGINT or
    SIGTERM: the relay only, executing no runs and running no handlers (the workers can then
    run with app.worker(relay=False)). Any number of relays may share a database.

    MODULE:ATTR names a storno.Storno instance (or a function returning one) whose broker is
    set. The database is chosen as for `storno worker`.
    """
    configure_logging("text")
    app = load_app(app_ref)
    if app.broker is None:
        raise click.ClickException(
            f"{app_ref} has no broker: storno relay sends the outbox through the application's "
            f"broker, so give it one (storno.Storno(..., broker=NatsBroker(...)))"
        )
    point_at(app, app_ref, url)
    asyncio.run(_relay(app))


# --- serve -------------------------------------------------------------------------------


def _graceful_server() -> type[Any]:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """Stops on SIGINT/SIGTERM (a second one forces it) and exits 0, like `storno worker`."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            def stop(signum: int, frame: Any) -> None:
                if self.should_exit:
                    self.force_exit = True
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer


@click.command(short_help="Serve the HTTP API, webhooks, dashboard and metrics.")
@click.option("--app", "app_ref", metavar="MODULE:ATTR", help="The application (its sagas).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--tokens-file",
    "tokens_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File of `ROLE NAME TOKEN` lines (ROLE: operate, read, webhook).",
)
@click.option(
    "--insecure-open",
    is_flag=True,
    help="Run without tokens, everyone an operator; only when bound to loopback.",
)
@click.option("--worker", "run_worker", is_flag=True, help="Also execute runs in this process.")
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--worker-id", help="Stable id of the worker (with --worker).")
@click.option(
    "--stuck-after",
    metavar="DURATION",
    callback=duration,
    default="1h",
    show_default=True,
    help="Default threshold for stuck runs (a saga's stuck_after wins).",
)
@click.option("--public-metrics", is_flag=True, help="Serve /metrics without a token.")
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option("--otel", is_flag=True, help="Write OpenTelemetry spans (storno[otel]).")
@db_option
def serve(
    app_ref: str | None,
    host: str,
    port: int,
    tokens_files: tuple[Path, ...],
    insecure_open: bool,
    run_worker: bool,
    concurrency: int,
    worker_id: str | None,
    stuck_after: float,
    public_metrics: bool,
    log_format: str,
    otel: bool,
    url: str,
) -> None:
    """Serve the HTTP API (/api/v1, OpenAPI at /openapi.json), webhooks, the dashboard (/ui)
    and Prometheus metrics (/metrics).

    Tokens come from $STORNO_API_TOKENS (operators), $STORNO_API_READ_TOKENS (read-only),
    $STORNO_WEBHOOK_TOKENS (webhooks only) and --tokens-file. Without any token the server
    refuses to start, unless --insecure-open is given and it binds to loopback.
    """
    try:
        from storno._server._auth import TokenStore, is_loopback
        from storno._server._factory import create_app
        from storno._server._logging import configure_logging
    except ImportError as exc:
        raise click.ClickException(
            f"the server needs the storno[server] extra ({exc.name} is missing): "
            f"install storno with it, e.g. pip install './storno[server]' from a checkout"
        ) from exc
    tokens = TokenStore.from_sources(files=tokens_files)
    if insecure_open:
        if not is_loopback(host):
            raise click.BadParameter(
                f"--insecure-open serves without tokens, so it binds to loopback only "
                f"(127.0.0.1 or ::1), not {host!r}",
                param_hint="'--insecure-open'",
            )
        if not tokens.empty:
            raise click.BadParameter(
                "tokens are configured; --insecure-open would ignore them. Drop one of the two",
                param_hint="'--insecure-open'",
            )
        tokens.open = True
    elif tokens.empty:
        raise click.ClickException(
            "no API tokens: set STORNO_API_TOKENS (operators) and STORNO_API_READ_TOKENS "
            "(read-only), or pass --tokens-file; for a local try-out only, --insecure-open "
            "serves without tokens on loopback"
        )
    configure_logging(log_format)
    app = app_for(app_ref, url)
    tracing = None
    if otel:
        try:
            from storno._server._tracing import Tracing

            tracing = Tracing()
        except ImportError as exc:
            raise click.ClickException(
                "--otel needs the storno[otel] extra: install storno with it, e.g. "
                "pip install './storno[otel]' from a checkout"
            ) from exc
    api = create_app(
        app,
        tokens=tokens,
        worker=run_worker,
        worker_options={"concurrency": concurrency, "worker_id": worker_id},
        stuck_after=stuck_after,
        public_metrics=public_metrics,
        tracing=tracing,
    )
    import uvicorn

    server_class = _graceful_server()
    config = uvicorn.Config(
        api, host=host, port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = server_class(config)
    roles = "open on loopback" if tokens.open else f"{len(tokens.tokens)} token(s)"
    log.info(
        "serving %s on http://%s:%d (%s; dashboard /ui/, API /api/v1, OpenAPI /openapi.json)",
        redact(app.url),
        host,
        port,
        roles,
    )
    server.run()
    if not server.started:
        sys.exit(1)


COMMANDS = (worker, relay, serve)
