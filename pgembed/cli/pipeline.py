"""`pgembed pipeline create|list|drop`: which tables are embedded, and how."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape

from pgembed import estimate, pipelines
from pgembed.cli import tables
from pgembed.cli.common import DsnOption, EmbeddedOption, JsonOption, connect, fail, friendly, out, print_json
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
    index_options: Annotated[str | None, typer.Option(
        help="The index's options as a JSON object: hnsw '{\"m\":16,\"ef_construction\":64}', "
             "ivfflat '{\"lists\":100}'.")] = None,
    distance: Annotated[str, typer.Option(help="cosine, l2 or ip.")] = "cosine",
    chunking: Annotated[str | None, typer.Option(
        help="recursive (default), markdown, tokens, truncate or none.")] = None,
    chunk_tokens: Annotated[int | None, typer.Option(help="Tokens per chunk (default: fits the model).")] = None,
    chunk_overlap: Annotated[int | None, typer.Option(help="Tokens shared by neighbouring chunks.")] = None,
    backfill: Annotated[bool, typer.Option(help="Queue the rows already in the table.")] = True,
    cost_center: Annotated[str | None, typer.Option(help="SQL expression naming who pays, e.g. tenant_id.")] = None,
    name: Annotated[str | None, typer.Option(help="Pipeline name (default: {table}_{model}).")] = None,
    another: Annotated[bool, typer.Option(
        "--another", help="Create it even if a pipeline of this table, content and model exists "
                          "(it gets a _2 name); --name does the same.")] = False,
    storage: Annotated[str, typer.Option(
        help="vector (default) or halfvec (half the size, indexed up to 4000 dimensions).")] = "vector",
    quantization: Annotated[str, typer.Option(
        help="none (default) or binary (an HNSW index of bits, searches re-ranked).")] = "none",
    rerank: Annotated[int | None, typer.Option(
        help="Binary quantization: candidates read per row returned (default 10).")] = None,
    late_chunking: Annotated[bool, typer.Option(
        "--late-chunking", help="Local models: run the model over the whole row and pool each "
                                "chunk's tokens, so every chunk carries its row's context.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only estimate the backfill: rows, chunks, tokens, cache, spend, time.")] = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Start embedding a table. Refused when a pipeline already embeds this content of this
    table with this model (unless --another or --name).

    Example: pgembed pipeline create articles "title || ' ' || body" --model hash:384
    """
    options = PipelineOptions(dimensions=dimensions, index=index, index_options=_json_object(index_options),
                              distance=distance, chunking=chunking, chunk_tokens=chunk_tokens,
                              chunk_overlap=chunk_overlap, backfill=backfill, cost_center=cost_center,
                              name=name, storage=storage, quantization=quantization, rerank=rerank,
                              late_chunking=late_chunking)
    if dry_run:
        with connect(dsn, embedded) as conn:
            planned = estimate.estimate(conn, estimate.backfill_target(conn, table_name, content, model, options))
        out.print(tables.estimate(f"{table_name} with {model}: dry run, nothing created", planned))
        return
    with connect(dsn, embedded) as conn:
        existing = [] if another or name else pipelines.same(conn, table_name, content, model, dimensions)
        if existing:
            fail(f"{', '.join(existing)} already embed{'s' if len(existing) == 1 else ''} this content of "
                 f"{table_name} with {model}; pass --another (or --name NAME) to create one more")
        created = pipelines.create(conn, table_name, content, model, options)
    out.print(f"pipeline [bold]{escape(created)}[/bold] created; vectors go to pgembed.{escape(created)}",
              highlight=False)


def _json_object(text: str | None) -> Any:
    """--index-options as the dict create_pipeline takes (SQL checks its keys and values)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--index-options must be a JSON object like '{{\"m\": 16}}' ({error})") from None


@pipeline_app.command("list")
@friendly
def list_pipelines(dsn: DsnOption = None, embedded: EmbeddedOption = False, as_json: JsonOption = False) -> None:
    """List pipelines: model, index (with its storage and quantization), rows queued.

    Example: pgembed pipeline list
    """
    with connect(dsn, embedded) as conn:
        rows = pipelines.list_all(conn)
    if as_json:
        print_json(rows)
        return
    out.print(tables.pipelines(rows))


@pipeline_app.command("drop")
@friendly
def drop(name: str, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Drop a pipeline: its triggers, queue and destination table.

    Example: pgembed pipeline drop articles_h384
    """
    with connect(dsn, embedded) as conn:
        pipelines.drop(conn, name)
    out.print(f"pipeline {escape(name)} dropped", highlight=False)
