"""What every command shares: --dsn, the consoles, and errors as one sentence with an exit
code a service manager can act on, never a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import psycopg
import typer
from rich.console import Console
from rich.markup import escape

from pgembed import db, migrate
from pgembed.metrics import MetricsUnavailable
from pgembed.pipelines import PipelineError
from pgembed.providers import ProviderError, UnknownModelError
from pgembed.worker import Unfinished

# Exit codes. A schema mismatch has its own: restarting cannot fix it (someone has to run
# `pgembed init` or upgrade pgembed), so deploy/pgembed-worker.service stops on it.
EXIT_ERROR = 1
EXIT_SCHEMA_MISMATCH = 3

# Errors a user can fix from what the sentence says; anything else is a bug and shows as one.
USER_ERRORS = (db.DatabaseError, PipelineError, ProviderError, UnknownModelError, MetricsUnavailable,
               Unfinished, ValueError)

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

DsnOption = Annotated[str | None, typer.Option(
    "--dsn", envvar="PGEMBED_DSN", show_envvar=True,
    help="PostgreSQL URL; without it, the embedded server under your data directory.")]


def fail(message: object, code: int = EXIT_ERROR) -> NoReturn:
    """Escaped, because messages quote what users typed and pip extras like 'pgembed[metrics]',
    which rich would otherwise take for markup and drop."""
    err.print(f"[red]error:[/red] {escape(db.redact(str(message)))}", highlight=False)
    raise typer.Exit(code)


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


def target(dsn: str | None) -> str:
    """The DSN to use; says so on stderr when that is the embedded server, so nobody mistakes
    it for their database."""
    resolved = db.resolve(dsn)
    if resolved.embedded:
        err.print(f"[dim]using the embedded PostgreSQL in {escape(str(db.embedded_data_dir()))}[/dim]",
                  highlight=False)
    return resolved.dsn


def connect(dsn: str | None) -> psycopg.Connection:
    """A connection to the database the user meant (see target)."""
    return db.connect(target(dsn))
