"""`pgembed search`: try a pipeline from the shell before writing the application's query."""

from __future__ import annotations

from typing import Annotated

import typer

from pgembed.cli import tables
from pgembed.cli.common import DsnOption, connect, friendly, out
from pgembed.search import search as nearest


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
    with connect(dsn) as conn:
        found = nearest(conn, pipeline, text, k, cost_center)
    out.print(tables.hits(pipeline, text, found))
