"""The ``storno`` command: run the demo, run a worker or the server, list runs and show a run's
timeline, act on runs, migrate the database.

Every command takes ``--db URL`` (or ``$STORNO_URL``). Errors storno raises end the command
with ``Error: ...`` and exit code 1; bad options exit with code 2.

This module is only the command group; the commands live in one module per group
(``_runs``, ``_ops``, ``_events``, ``_db``, ``_serve``, ``_mcp``, ``_demo``), and what they share in
``_common``.
"""

from __future__ import annotations

from typing import Any

import click

from storno._cli import _db, _demo, _events, _mcp, _ops, _runs, _serve
from storno._cli._timeline import render_run
from storno._errors import StornoError

__all__ = ["main", "render_run"]


class _Group(click.Group):
    """Turns storno's own errors (whose messages say what to do) into ``Error: ...``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StornoError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="storno")
def main() -> None:
    """storno: durable sagas. Steps across systems either all take effect or are compensated
    in reverse, and survive crashes."""


_COMMANDS = (
    _demo.demo,
    *_runs.COMMANDS,
    *_ops.COMMANDS,
    *_events.COMMANDS,
    _db.db,
    *_serve.COMMANDS,
    *_mcp.COMMANDS,
)
for _command in _COMMANDS:
    main.add_command(_command)
