"""`pgembed pipeline create|list|drop`: which tables are embedded, and how."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from pgembed import pipelines
from pgembed.cli import tables
from pgembed.cli.common import DsnOption, connect, friendly, out
from pgembed.pipelines import PipelineOptions

pipeline_app = typer.Typer(no_args_is_help=True, help="Create, list and drop pipelines.")


@pipeline_app.command("create")
@friendly
def create(
    table_name: Annotated[str, typer.Argument(metavar="TABLE", help="Source table, as in SQL.")],
    content: Annotated[str, typer.Argument(help="SQL expression over the row, e.g. \"title || ' ' || body\".")],
    model: Annotated[str, typer.Option(help="provider:model, e.g. openai:text-embedding-3-small or hash:384.")],
    dimensions: Annotated[int | None, typer.Option(help="Output dimensions (Matryoshka).")] = None,
    index: Annotated[str, typer.Option(help="hnsw, ivfflat or none.")] = "hnsw",
    distance: Annotated[str, typer.Option(help="cosine, l2 or ip.")] = "cosine",
    chunking: Annotated[str | None, typer.Option(
        help="recursive (default), markdown, tokens, truncate or none.")] = None,
    chunk_tokens: Annotated[int | None, typer.Option(help="Tokens per chunk (default: fits the model).")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(help="Tokens shared by neighbouring chunks.")] = None,
    backfill: Annotated[bool, typer.Option(help="Queue the rows already in the table.")] = True,
    cost_center: Annotated[str | None, typer.Option(help="SQL expression naming who pays, e.g. tenant_id.")] = None,
    name: Annotated[str | None, typer.Option(help="Pipeline name (default: {table}_{model}).")] = None,
    storage: Annotated[str, typer.Option(
        help="vector (default) or halfvec (half the size, indexed up to 4000 dimensions).")] = "vector",
    quantization: Annotated[str, typer.Option(
        help="none (default) or binary (an HNSW index of bits, searches re-ranked).")] = "none",
    rerank: Annotated[int | None, typer.Option(
        help="Binary quantization: candidates read per row returned (default 10).")] = None,
    dsn: DsnOption = None,
) -> None:
    """Start embedding a table.

    Example: pgembed pipeline create articles "title || ' ' || body" --model hash:384
    """
    options = PipelineOptions(dimensions=dimensions, index=index, distance=distance,
                              chunking=chunking, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
                              backfill=backfill, cost_center=cost_center, name=name,
                              storage=storage, quantization=quantization, rerank=rerank)
    with connect(dsn) as conn:
        created = pipelines.create(conn, table_name, content, model, options)
    out.print(f"pipeline [bold]{escape(created)}[/bold] created; vectors go to pgembed.{escape(created)}",
              highlight=False)


@pipeline_app.command("list")
@friendly
def list_pipelines(dsn: DsnOption = None) -> None:
    """List pipelines.

    Example: pgembed pipeline list
    """
    with connect(dsn) as conn:
        rows = pipelines.list_all(conn)
    out.print(tables.pipelines(rows))


@pipeline_app.command("drop")
@friendly
def drop(name: str, dsn: DsnOption = None) -> None:
    """Drop a pipeline: its triggers, queue and destination table.

    Example: pgembed pipeline drop articles_h384
    """
    with connect(dsn) as conn:
        pipelines.drop(conn, name)
    out.print(f"pipeline {escape(name)} dropped", highlight=False)
