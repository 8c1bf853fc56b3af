"""`pgembed …`: the command line. Every command takes --dsn (or PGEMBED_DSN); with neither
it uses the embedded PostgreSQL and says so. Errors are one sentence, never a traceback."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, TypeVar

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from pgembed import db, migrate, pipelines
from pgembed.pipelines import PipelineError, PipelineOptions
from pgembed.providers import ProviderError, UnknownModelError
from pgembed.search import search as run_search
from pgembed.worker import Worker, WorkerConfig

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Keep pgvector embeddings of PostgreSQL rows correct, cheap and fresh.")
pipeline_app = typer.Typer(no_args_is_help=True, help="Create, list and drop pipelines.")
app.add_typer(pipeline_app, name="pipeline")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

DsnOption = Annotated[str | None, typer.Option(
    "--dsn", envvar="PGEMBED_DSN", show_envvar=True,
    help="PostgreSQL URL; without it, the embedded server under your data directory.")]


def friendly(fn: F) -> F:
    """Turns the errors a user can fix into one clear line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (db.DatabaseError, PipelineError, ProviderError, UnknownModelError,
                ValueError) as error:
            err.print(f"[red]error:[/red] {error}", highlight=False)
        except psycopg.errors.UndefinedTable as error:
            err.print(f"[red]error:[/red] the pgembed schema is missing ({error.diag.message_primary});"
                      " run `pgembed init` first", highlight=False)
        except psycopg.Error as error:
            err.print(f"[red]error:[/red] {error.diag.message_primary or error}", highlight=False)
        raise typer.Exit(1)

    return wrapper  # type: ignore[return-value]


def target(dsn: str | None) -> str:
    resolved = db.resolve(dsn)
    if resolved.embedded:
        err.print(f"[dim]using the embedded PostgreSQL in {db.embedded_data_dir()}[/dim]")
    return resolved.dsn


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


@app.command()
@friendly
def init(dsn: DsnOption = None) -> None:
    """Create or upgrade the pgembed schema. Safe to run again.

    Example: pgembed init --dsn postgresql://admin@db/app
    """
    url = target(dsn)
    migrate.upgrade(url)
    out.print(f"pgembed schema at revision {migrate.head_revision()}")


@pipeline_app.command("create")
@friendly
def pipeline_create(
    table_name: Annotated[str, typer.Argument(metavar="TABLE", help="Source table, as in SQL.")],
    content: Annotated[str, typer.Argument(help="SQL expression over the row, e.g. \"title || ' ' || body\".")],
    model: Annotated[str, typer.Option(help="provider:model, e.g. openai:text-embedding-3-small or hash:384.")],
    dimensions: Annotated[int | None, typer.Option(help="Output dimensions (Matryoshka).")] = None,
    index: Annotated[str, typer.Option(help="hnsw, ivfflat or none.")] = "hnsw",
    distance: Annotated[str, typer.Option(help="cosine, l2 or ip.")] = "cosine",
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk; 0 = no chunking.")] = 0,
    chunk_overlap: Annotated[int, typer.Option(help="Tokens shared by neighbouring chunks.")] = 0,
    backfill: Annotated[bool, typer.Option(help="Queue the rows already in the table.")] = True,
    cost_center: Annotated[str | None, typer.Option(help="SQL expression naming who pays, e.g. tenant_id.")] = None,
    name: Annotated[str | None, typer.Option(help="Pipeline name (default: {table}_{model}).")] = None,
    dsn: DsnOption = None,
) -> None:
    """Start embedding a table.

    Example: pgembed pipeline create articles "title || ' ' || body" --model hash:384
    """
    options = PipelineOptions(dimensions=dimensions, index=index, distance=distance,
                              chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
                              backfill=backfill, cost_center=cost_center, name=name)
    with db.connect(target(dsn)) as conn:
        created = pipelines.create(conn, table_name, content, model, options)
    out.print(f"pipeline [bold]{created}[/bold] created; vectors go to pgembed.{created}")


@pipeline_app.command("list")
@friendly
def pipeline_list(dsn: DsnOption = None) -> None:
    """List pipelines.

    Example: pgembed pipeline list
    """
    with db.connect(target(dsn)) as conn:
        rows = pipelines.list_all(conn)
    columns = ["name", "source", "content", "model", "dimensions", "index_type", "queued"]
    out.print(table("pipelines", columns, ([r[c] for c in columns] for r in rows)))


@pipeline_app.command("drop")
@friendly
def pipeline_drop(name: str, dsn: DsnOption = None) -> None:
    """Drop a pipeline: its triggers, queue and destination table.

    Example: pgembed pipeline drop articles_h384
    """
    with db.connect(target(dsn)) as conn:
        pipelines.drop(conn, name)
    out.print(f"pipeline {name} dropped")


@app.command()
@friendly
def worker(
    until_empty: Annotated[bool, typer.Option(help="Drain the queue, then exit.")] = False,
    concurrency: Annotated[int, typer.Option(min=1, help="Batches in flight at once.")] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per claim.")] = 64,
    poll_interval: Annotated[float, typer.Option(help="Seconds between polls when idle.")] = 5.0,
    lease_seconds: Annotated[float, typer.Option(help="How long a claim is held.")] = 300.0,
    max_attempts: Annotated[int, typer.Option(min=1, help="Failures before a row is parked.")] = 5,
    retry_base: Annotated[float, typer.Option(help="First retry delay of a failed row (s).")] = 10.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    dsn: DsnOption = None,
) -> None:
    """Embed queued rows; runs until stopped, or with --until-empty until the queue is drained.

    Example: pgembed worker --until-empty --concurrency 4
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    config = WorkerConfig(concurrency=concurrency, batch_size=batch_size,
                          poll_interval=poll_interval, lease_seconds=lease_seconds,
                          until_empty=until_empty, max_attempts=max_attempts,
                          retry_base=retry_base)
    stats = asyncio.run(Worker(target(dsn), config).run())
    out.print(f"{stats.written} rows embedded, {stats.removed} removed, {stats.failed} failed "
              f"in {stats.batches} batches")


@app.command()
@friendly
def search(
    pipeline: str,
    text: str,
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 5,
    cost_center: Annotated[str | None, typer.Option(help="Who pays for the query embedding.")] = None,
    dsn: DsnOption = None,
) -> None:
    """Nearest rows to a text.

    Example: pgembed search articles_h384 "how do vaccines work" -k 5
    """
    with db.connect(target(dsn)) as conn:
        hits = run_search(conn, pipeline, text, k, cost_center)
    out.print(table(f"{pipeline}: {text}", ["key", "distance", "chunk"],
                    ((", ".join(f"{k}={v}" for k, v in h.key.items()), f"{h.distance:.4f}",
                      h.chunk[:100]) for h in hits)))


@app.command()
@friendly
def quickstart(
    model: Annotated[str | None, typer.Option(help="Model to use (default: the best available).")] = None,
    dsn: DsnOption = None,
) -> None:
    """Semantic search in one command: sample data, a pipeline, a drain, two searches.

    Example: pgembed quickstart
    """
    from pgembed import quickstart as qs

    qs.run(target(dsn), out, model)
    status_table = globals().get("status")
    if callable(status_table):
        out.print()
        status_table(dsn=dsn)
