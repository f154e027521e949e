"""What the ``storno`` commands share: the ``--db`` option, opening a database for a read
command, loading ``--app`` and pointing it at the command's database, and the output helpers.
"""

from __future__ import annotations

import getpass
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from storno._app import DEFAULT_URL, Storno
from storno._model import parse_duration
from storno._store._migrations import backend_of, redact
from storno._store._sqlite_connection import parse_sqlite_url
from storno._views import RunInfo

__all__ = [
    "log",
    "db_option",
    "url_option",
    "actor_option",
    "by_option",
    "duration",
    "opened",
    "load_app",
    "point_at",
    "app_for",
    "echo_json",
    "summary",
    "ts",
]

log = logging.getLogger("storno.cli")

F = TypeVar("F", bound=Callable[..., Any])


# --- options -----------------------------------------------------------------------------


def url_option(help: str) -> Callable[[F], F]:
    """The ``--db URL`` option (or ``$STORNO_URL``), passed to the command as ``url``."""
    return click.option(
        "--db",
        "url",
        envvar="STORNO_URL",
        show_envvar=True,
        default=DEFAULT_URL,
        show_default=True,
        metavar="URL",
        help=help,
    )


db_option = url_option("Database holding the runs, e.g. sqlite:///storno.db.")


def _actor() -> str:
    return os.environ.get("STORNO_ACTOR") or getpass.getuser()


def actor_option(help: str) -> Callable[[F], F]:
    """The operator commands' ``--by`` (default ``$STORNO_ACTOR``, else the login name)."""
    return click.option(
        "--by", default=_actor, show_default="$STORNO_ACTOR or the login name", help=help
    )


by_option = actor_option("Who does this; recorded in the run's history.")


def duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """An option's callback: ``90s``, ``30m``, ``1h``, ``2d`` as seconds (see
    :func:`storno._model.parse_duration`), refused as a bad parameter otherwise."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


# --- opening a database for a read command -----------------------------------------------


async def opened(url: str) -> Storno:
    """An application on ``url``, opened, once its store says the database exists and holds
    storno's tables: opening would create them (a new SQLite file, tables in a mistyped
    PostgreSQL schema), and a read command must leave a wrong database as it found it."""
    app = Storno(url)
    if not await app.store.exists():
        raise click.ClickException(_missing(url))
    if not (await app.store.schema_status()).exists:
        raise click.ClickException(_not_storno(url))
    await app.open()
    return app


def _sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names, for messages that name it; ``None`` for PostgreSQL."""
    return parse_sqlite_url(url)[0] if backend_of(url) == "sqlite" else None


def _missing(url: str) -> str:
    path = _sqlite_path(url)
    if path is None:  # no schema: the same advice as for a schema without storno's tables
        return _not_storno(url)
    return (
        f"no storno database at {str(path)!r} (from --db {redact(url)}); pass the --db URL "
        f"your application uses, or create one with `storno demo`"
    )


def _not_storno(url: str) -> str:
    path = _sqlite_path(url)
    if path is None:
        return (
            f"no storno tables at {redact(url)}; pass the --db URL your application uses, or "
            f"create them with `storno db upgrade`"
        )
    what = "an empty file" if path.stat().st_size == 0 else "it has no storno tables"
    return (
        f"{str(path)!r} is not a storno database ({what}; from --db {redact(url)}); read "
        f"commands leave it as it is. Pass the --db URL your application uses"
    )


# --- the application named by --app ------------------------------------------------------


def _bad_app(message: str) -> click.BadParameter:
    ctx = click.get_current_context(silent=True)
    return click.BadParameter(message, ctx=ctx, param_hint="'--app'")


def load_app(ref: str) -> Storno:
    """The Storno application named by ``MODULE:ATTR`` (an instance, or a factory)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise _bad_app(f"{ref!r} is not MODULE:ATTR, e.g. myproject.sagas:app")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise _bad_app(
                f"no module named {exc.name!r} (looked in {Path.cwd()} and sys.path)"
            ) from exc
        raise _bad_app(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise _bad_app(f"importing {module_name!r} raised {exc!r}") from exc
    found: Any = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise _bad_app(f"module {module_name!r} has no attribute {attr!r}")
        found = getattr(found, part)
    if callable(found) and not isinstance(found, Storno):
        try:
            found = found()
        except Exception as exc:
            raise _bad_app(f"calling {ref}() raised {exc!r}") from exc
    if not isinstance(found, Storno):
        raise _bad_app(
            f"{ref} is of type {type(found).__name__}, not a storno.Storno application "
            f"(or a function without arguments that returns one)"
        )
    return found


def _same_database(a: str, b: str) -> bool:
    """Whether two URLs name one database (SQLite paths compared once resolved)."""
    if a == b:
        return True
    if backend_of(a) == backend_of(b) == "sqlite":
        return parse_sqlite_url(a)[0].resolve() == parse_sqlite_url(b)[0].resolve()
    return False


def point_at(app: Storno, ref: str, url: str) -> None:
    """Make ``app`` use the database the command was given (``--db``, else ``$STORNO_URL``),
    or refuse to go on when the application's code names another one.

    A URL written in ``Storno(...)`` and a different one in the environment would otherwise
    leave the worker on one database while `storno list` reads the other.
    """
    source = click.get_current_context().get_parameter_source("url")
    if source is click.core.ParameterSource.COMMANDLINE:
        where = "--db"
    elif source is click.core.ParameterSource.ENVIRONMENT:
        where = "$STORNO_URL"
    else:
        return  # the command names no database: the application's own URL it is
    if app.url_source == "argument":
        if not _same_database(app.url, url):
            raise click.ClickException(
                f"{ref} names its database in its code ({redact(app.url)}) but {where} says "
                f"{redact(url)}; refusing to start on one while the other is meant. Write "
                f"Storno(sagas=[...]) without a URL so that {where} decides, or make them "
                f"the same"
            )
        return
    if app.url != url:
        app.use_database(url)


def app_for(app_ref: str | None, url: str) -> Storno:
    """The application named by --app on the command's database (see :func:`point_at`), or
    one without sagas on ``url``."""
    if app_ref is None:
        return Storno(url)
    app = load_app(app_ref)
    point_at(app, app_ref, url)
    return app


# --- output ------------------------------------------------------------------------------


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def ts(ts: float) -> str:
    """A time as ``YYYY-MM-DD HH:MM:SS``, in UTC (the commands say so next to it)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def summary(run: RunInfo) -> dict[str, Any]:
    """A listed run as JSON: no steps or history, which listing does not load."""
    out = run.to_json(with_history=False)
    del out["steps"]
    return out
