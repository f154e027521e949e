"""``storno mcp``: serve the application's runs to an MCP client over stdio."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from storno._cli._common import app_for, db_option

__all__ = ["COMMANDS"]


@click.command(short_help="Serve runs to an MCP client over stdio.")
@click.option("--app", "app_ref", metavar="MODULE:ATTR", help="The application (its sagas).")
@click.option(
    "--tokens-file",
    "tokens_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File of `ROLE NAME TOKEN` lines (ROLE: operate, read).",
)
@click.option("--worker", "run_worker", is_flag=True, help="Also execute runs in this process.")
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True)
@db_option
def mcp(
    app_ref: str | None,
    tokens_files: tuple[Path, ...],
    run_worker: bool,
    concurrency: int,
    url: str,
) -> None:
    """Serve the application's runs to an MCP client over stdio: start a saga or a checked
    plan (the run id comes back at once), read a run's status and history, list the runs
    waiting for approval, approve or reject them.

    Approving and rejecting take an operator token, presented by the client as the tools'
    `token` argument: one of $STORNO_API_TOKENS or of --tokens-file (read-only tokens of
    $STORNO_API_READ_TOKENS are refused). Runs are executed by `storno worker`, or by this
    process with --worker. Logs go to stderr; stdout carries the protocol.
    """
    try:
        from storno.mcp_server import create_server
    except ImportError as exc:
        raise click.ClickException(
            f"storno mcp needs the storno[mcp] extra ({exc.name} is missing): install storno "
            f"with it, e.g. pip install './storno[mcp]' from a checkout"
        ) from exc
    from storno._server._auth import TokenStore
    from storno._server._logging import configure_logging

    tokens = TokenStore.from_sources(files=tokens_files)
    configure_logging("text")  # to stderr
    logging.getLogger("mcp").setLevel(logging.WARNING)  # not a line per request
    app = app_for(app_ref, url)
    server = create_server(
        app, tokens=tokens, worker=run_worker, worker_options={"concurrency": concurrency}
    )
    server.run("stdio")


COMMANDS = (mcp,)
