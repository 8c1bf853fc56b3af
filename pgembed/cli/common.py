"""What every command shares: --dsn, the consoles, and errors as one sentence with an exit
code a service manager can act on, never a traceback."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import psycopg
import typer
from rich.console import Console
from rich.markup import escape

from pgembed import db, health, migrate
from pgembed.metrics import MetricsUnavailable
from pgembed.pipelines import PipelineError
from pgembed.providers import ProviderError, UnknownModelError
from pgembed.worker import Unfinished

# Exit codes. A schema mismatch has its own: restarting cannot fix it (someone has to run
# `pgembed init` or upgrade pgembed), so deploy/pgembed-worker.service stops on it.
# A usage error (what was typed, or what is configured, cannot be run) is 2, as for a bad
# option: restarting cannot fix it either.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SCHEMA_MISMATCH = 3

# Errors a user can fix from what the sentence says; anything else is a bug and shows as one.
USER_ERRORS = (db.DatabaseError, PipelineError, ProviderError, UnknownModelError, MetricsUnavailable,
               Unfinished, ValueError)

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

DsnOption = Annotated[str | None, typer.Option(
    "--dsn", envvar="PGEMBED_DSN", show_envvar=True,
    help="PostgreSQL URL or conninfo; without it libpq's PGHOST, PGDATABASE, PGSERVICE...; "
         "with nothing configured, the embedded server under your data directory.")]
EmbeddedOption = Annotated[bool, typer.Option(
    "--embedded", help="Use the embedded PostgreSQL under your data directory, whatever is configured.")]


def fail(message: object, code: int = EXIT_ERROR) -> NoReturn:
    """Escaped, because messages quote what users typed and pip extras like 'pgembed[metrics]',
    which rich would otherwise take for markup and drop."""
    err.print(f"[red]error:[/red] {escape(db.redact(str(message)))}", highlight=False)
    raise typer.Exit(code)


def print_json(document: Any) -> None:
    """`--json`: one JSON document on stdout and nothing else there (notes go to stderr), for
    scripts: times ISO 8601, intervals in seconds, sums as numbers."""
    sys.stdout.write(json.dumps(document, default=health.as_json, indent=2) + "\n")


def print_rows(rows: list[dict[str, Any]], as_json: bool, table: Callable[[list[dict[str, Any]]], Any],
               none: str) -> None:
    """A listing: the rows as JSON (`--json`), else their table, else what to do about none."""
    if as_json:
        print_json(rows)
    elif rows:
        out.print(table(rows))
    else:
        out.print(none, highlight=False)


def print_dropped(what: str, name: str, as_json: bool) -> None:
    """What a drop command says: `{"dropped": name}` with --json, else one line."""
    if as_json:
        print_json({"dropped": name})
    else:
        out.print(f"{what} {escape(name)} dropped", highlight=False)


JsonOption = Annotated[bool, typer.Option(
    "--json", help="Print one JSON document on stdout instead of tables (README: Command line).")]


def friendly(fn: F) -> F:
    """Turns the errors a user can fix into one clear line and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except migrate.SchemaMismatch as error:
            fail(error, EXIT_SCHEMA_MISMATCH)
        except USER_ERRORS as error:
            fail(error)
        except psycopg.errors.UndefinedTable as error:
            fail(f"the pgembed schema is missing ({error.diag.message_primary}); run `pgembed init` first")
        except psycopg.Error as error:
            fail(error.diag.message_primary or " ".join(str(error).split()) or type(error).__name__)

    return wrapper  # type: ignore[return-value]


def target(dsn: str | None, embedded: bool = False) -> str:
    """The DSN to use; says so on stderr, in one line with its DSN, when that is the embedded
    server, so nobody mistakes it for their database."""
    resolved = db.resolve(dsn, embedded=embedded)
    if resolved.embedded:
        why = "" if embedded else " (nothing configured)"
        # soft_wrap: a DSN cut across lines could not be copied
        err.print(f"[dim]using the embedded PostgreSQL{why}: {escape(resolved.dsn)}[/dim]",
                  highlight=False, soft_wrap=True)
    return resolved.dsn


def configured_target(dsn: str | None, embedded: bool, command: str) -> str:
    """For a command that must not fall back to the embedded server when nothing is
    configured (a worker on a host whose variables were forgotten): the DSN, or a usage
    error saying what to pass."""
    if embedded or db.configured(dsn) is not None:
        return target(dsn, embedded)
    fail(f"no database configured for `pgembed {command}`: pass --dsn (or set PGEMBED_DSN, or libpq's "
         "PGHOST/PGDATABASE/PGSERVICE), or --embedded for the embedded PostgreSQL", EXIT_USAGE)


def connect(dsn: str | None, embedded: bool = False) -> psycopg.Connection:
    """A connection to the database the user meant (see target)."""
    return db.connect(target(dsn, embedded))
