"""``storno demo``: the booking saga against fake providers, shown as ``storno show`` would."""

from __future__ import annotations

import asyncio

import click

from storno._cli._common import db_option, echo_json
from storno._cli._timeline import render_run
from storno._demo import STEP_NAMES, render_ledgers, run_demo
from storno._model import RunStatus

__all__ = ["demo"]


@click.command(short_help="Run the booking saga against fake providers.")
@click.option(
    "--fail-at",
    type=click.Choice(STEP_NAMES),
    help="Make this step fail for good, so that the run compensates in reverse.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run and ledgers as JSON.")
@db_option
def demo(fail_at: str | None, as_json: bool, url: str) -> None:
    """Run the booking saga (book slot, charge card, send SMS, sync calendar) against fake
    providers. The payment provider loses its first answer: the read-back finds the charge."""
    result = asyncio.run(run_demo(url, fail_at))
    info = result.info
    if as_json:
        echo_json({**info.to_json(), "ledgers": result.ledgers})
    else:
        click.echo("\n".join(render_run(info) + render_ledgers(result.ledgers)))
    if info.status not in (RunStatus.COMPLETED, RunStatus.COMPENSATED):
        raise click.ClickException(f"the demo run ended {info.status.value}; that is a bug")
