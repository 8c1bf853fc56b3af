"""`pgembed batch submit|poll|collect|cancel|status`: bulk rows through the provider's Batch
API (pgembed/batch_api/, sql/batch_api.sql)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from pgembed.batch_api import MIN_ROWS_VARIABLE, BatchAPI, BatchAPIError, Polled
from pgembed.cli.common import (
    EXIT_USAGE,
    DsnOption,
    EmbeddedOption,
    JsonOption,
    fail,
    friendly,
    out,
    print_json,
    print_rows,
    target,
)
from pgembed.cli.tables import Col, Fitted, count, when

batch_app = typer.Typer(no_args_is_help=True, help="Send bulk rows through the provider's Batch API (half price).")
T = TypeVar("T")
BatchArgument = Annotated[int, typer.Argument(help="The batch's id, as `pgembed batch status` lists it.")]


def _run(dsn: str | None, embedded: bool, call: Callable[[BatchAPI], Awaitable[T]]) -> T:
    resolved = target(dsn, embedded)

    async def run() -> T:
        async with BatchAPI(resolved) as api:
            return await call(api)

    try:
        return asyncio.run(run())
    except BatchAPIError as error:
        fail(error, EXIT_USAGE)


def _polled_line(p: Polled) -> str:
    line = f"batch {p.batch}: {p.provider_status}"
    if p.released:
        line += f", {p.released} rows changed since submission given back"
    c = p.collected
    if c is not None:
        line += (f"; collected: {c.stored} rows stored, {c.requeued} requeued for the workers, "
                 f"{c.failed_lines} lines failed or expired, {c.tokens} tokens at half price")
    return line


@batch_app.command("submit")
@friendly
def submit(
    pipeline: Annotated[str, typer.Argument(help="The pipeline whose backfill or migration rows to send.")],
    threshold: Annotated[int | None, typer.Option(
        min=1, help=f"Send only with at least this many bulk rows ready (default: {MIN_ROWS_VARIABLE}, "
                    "else 10,000).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=50_000, help="Rows in the batch, at most.")] = 50_000,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Take a pipeline's ready bulk rows from the workers and send them as one batch.

    Example: pgembed batch submit articles_body_text_embedding_3_small
    """
    result = _run(dsn, embedded, lambda api: api.submit(pipeline, threshold=threshold, limit=limit))
    if as_json:
        print_json(dataclasses.asdict(result))
    elif result.batch is None or result.provider_id is None:
        out.print(f"nothing sent for {escape(pipeline)}: {result.reason}", highlight=False)
    else:
        left = f"; {result.left} rows over one batch's limits stay queued" if result.left else ""
        out.print(f"batch {result.batch} ({escape(result.provider_id)}): {result.rows} rows in {result.lines} "
                  f"requests, {result.inputs} inputs{left}; `pgembed batch poll` collects it when done",
                  highlight=False)


@batch_app.command("poll")
@friendly
def poll(
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline's batches.")] = None,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Ask the provider about every open batch and collect those that are done.

    Example: pgembed batch poll
    """
    polled = _run(dsn, embedded, lambda api: api.poll(pipeline))
    if as_json:
        print_json([dataclasses.asdict(p) for p in polled])
    elif not polled:
        out.print("no open batches", highlight=False)
    for p in polled if not as_json else []:
        out.print(_polled_line(p), highlight=False)


@batch_app.command("collect")
@friendly
def collect(batch: BatchArgument, as_json: JsonOption = False, dsn: DsnOption = None,
            embedded: EmbeddedOption = False) -> None:
    """Store a batch the provider has finished (completed, expired or cancelled).

    Example: pgembed batch collect 3
    """
    result = _run(dsn, embedded, lambda api: api.collect(batch))
    polled = Polled(result.batch, result.provider_status, collected=result)
    if as_json:
        print_json(dataclasses.asdict(result))
    else:
        out.print(_polled_line(polled), highlight=False)


@batch_app.command("cancel")
@friendly
def cancel(batch: BatchArgument, as_json: JsonOption = False, dsn: DsnOption = None,
           embedded: EmbeddedOption = False) -> None:
    """Cancel a batch; what the provider finished is still stored, the rest requeued.

    Example: pgembed batch cancel 3
    """
    result = _run(dsn, embedded, lambda api: api.cancel(batch))
    if as_json:
        print_json(dataclasses.asdict(result))
    else:
        out.print(_polled_line(result), highlight=False)


def _table(rows: list[dict[str, Any]]) -> Fitted:
    return Fitted("provider batches", [
        Col("id", whole=True), Col("pipeline", key=True), Col("state", whole=True), Col("provider", whole=True),
        Col("rows"), Col("held"), Col("stored"), Col("requeued", spare=1), Col("lines", spare=2),
        Col("created", whole=True, spare=3)],
        ([r["id"], r["pipeline"], r["state"], r["provider_status"], count(r["rows"]), count(r["held"]),
          count(r["stored"]), count(r["requeued"]), count(r["lines"]), when(r["created_at"])] for r in rows))


@batch_app.command("status")
@friendly
def status(
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline's batches.")] = None,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Every batch: its state here and at the provider, rows held, stored and requeued.

    Example: pgembed batch status
    """
    rows = _run(dsn, embedded, lambda api: api.status(pipeline))
    print_rows(rows, as_json, _table, "no provider batches; `pgembed batch submit PIPELINE` sends one")
