"""``storno serve`` (HTTP API, webhook, dashboard, metrics) and ``storno stuck``."""

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
from storno._cli import _db_option, _echo_json, _load_app, _opened, _point_at, _ts
from storno._model import parse_duration
from storno._store._migrations import redact

__all__ = ["COMMANDS"]

log = logging.getLogger("storno.cli")


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _app_for(app_ref: str | None, url: str) -> Storno:
    """The application named by --app on the command's database (see `_point_at`), or one
    without sagas on ``url``."""
    if app_ref is None:
        return Storno(url)
    app = _load_app(app_ref)
    _point_at(app, app_ref, url)
    return app


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
    callback=_duration,
    default="1h",
    show_default=True,
    help="Default threshold for stuck runs (a saga's stuck_after wins).",
)
@click.option("--public-metrics", is_flag=True, help="Serve /metrics without a token.")
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option("--otel", is_flag=True, help="Write OpenTelemetry spans (storno[otel]).")
@_db_option
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
    app = _app_for(app_ref, url)
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


@click.command(short_help="List runs that made no progress for too long.")
@click.option(
    "--older-than",
    metavar="DURATION",
    callback=_duration,
    help="Threshold for every saga (default: each saga's stuck_after, else --default).",
)
@click.option(
    "--default",
    "default",
    metavar="DURATION",
    callback=_duration,
    default="1h",
    show_default=True,
    help="Threshold for sagas without stuck_after.",
)
@click.option("--app", "app_ref", metavar="MODULE:ATTR", help="Application (saga thresholds).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.option("--fail-if-any", is_flag=True, help="Exit 3 when a run is stuck (for alarms).")
@_db_option
@click.pass_context
def stuck(
    ctx: click.Context,
    older_than: float | None,
    default: float,
    app_ref: str | None,
    limit: int,
    as_json: bool,
    fail_if_any: bool,
    url: str,
) -> None:
    """List runs that have not ended and made no progress for longer than their threshold.
    A waiting or scheduled run whose wake time is still ahead is not stuck."""
    from storno._server._stats import find_stuck

    given = None if app_ref is None else _app_for(app_ref, url)

    async def fetch() -> list[Any]:
        async with given or await _opened(url) as app:
            return await find_stuck(app, older_than=older_than, default=default, limit=limit)

    found = asyncio.run(fetch())
    if as_json:
        _echo_json([s.to_json() for s in found])
    elif not found:
        click.echo("(no stuck runs)")
    else:
        for s in found:
            click.echo(
                f"{s.run.run_id}  {s.run.saga}  {s.run.status.value}  "
                f"last change {_ts(s.run.updated_at)} UTC\n  {s.reason}"
            )
    if fail_if_any and found:
        ctx.exit(3)


COMMANDS = (serve, stuck)
