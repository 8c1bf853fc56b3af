"""`pgembed search`: try a pipeline from the shell before writing the application's query."""

from __future__ import annotations

from typing import Annotated

import psycopg
import typer
from rich.markup import escape

from pgembed import audit as audits
from pgembed.aliases import resolve
from pgembed.cli import tables
from pgembed.cli.common import (
    EXIT_USAGE,
    DsnOption,
    EmbeddedOption,
    JsonOption,
    connect,
    err,
    fail,
    friendly,
    out,
    print_json,
)
from pgembed.search import search as nearest


@friendly
def search(
    pipeline: str,
    text: str,
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 5,
    cost_center: Annotated[str | None, typer.Option(help="Who pays for the query embedding.")] = None,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Nearest rows to a text.

    PIPELINE may be an alias (pgembed alias list): it searches the pipeline the alias
    points at.

    Example: pgembed search articles_h384 "how do vaccines work" -k 5
    """
    if not text.strip():
        fail("the search text is empty: give the words to search for, e.g. "
             "pgembed search PIPELINE \"how do I bake bread\"", EXIT_USAGE)
    with connect(dsn, embedded) as conn:
        name = resolve(conn, pipeline)  # an alias: the pipeline it points at, once
        found = nearest(conn, name, text, k, cost_center)
        coverage = _coverage(conn, name)
    if as_json:
        print_json({"pipeline": name, "target": pipeline, "query": text, "k": k, **coverage,
                    "hits": [{"key": h.key, "distance": h.distance, "chunk": h.chunk} for h in found]})
        return
    note = _partial(name, coverage)
    if note:
        err.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    out.print(tables.hits(name, text, found) if found else "no results")


def _coverage(conn: psycopg.Connection, pipeline: str) -> dict[str, int | None]:
    """How much of the source the results can come from (pgembed.pipeline_status)."""
    [row] = audits.status(conn, pipeline)
    return {name: row[name] for name in ("source_rows", "embedded_rows", "empty", "queued")}


def _partial(pipeline: str, coverage: dict[str, int | None]) -> str | None:
    """What a reader must know before trusting the results: nothing embedded yet, or a
    backfill still under way; None when every row is embedded."""
    source, embedded, queued = coverage["source_rows"], coverage["embedded_rows"] or 0, coverage["queued"] or 0
    if source is not None and embedded + (coverage["empty"] or 0) >= source:
        return None  # rows with empty content have nothing to embed
    if embedded == 0:
        return (f"nothing in {pipeline} is embedded yet ({queued:,} rows queued): "
                "run `pgembed worker`, the results will come from its vectors")
    of = "" if source is None else f" of {source:,}"
    return f"only {embedded:,}{of} rows of {pipeline} are embedded ({queued:,} queued): the results cover those"
