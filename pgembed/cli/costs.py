"""`pgembed costs`: what the embeddings cost, what looks like a runaway, what the cache saved
(sql/costs.sql)."""

from __future__ import annotations

from typing import Annotated

import typer

from pgembed import costs as cost_views
from pgembed.cli import tables
from pgembed.cli.common import DsnOption, EmbeddedOption, JsonOption, connect, friendly, out, print_json
from pgembed.costs import Grouping


@friendly
def costs(
    days: Annotated[int, typer.Option(min=1, help="Calendar days to cover, today included.")] = 7,
    by: Annotated[Grouping, typer.Option(help="Group by purpose or by cost center.")] = Grouping.purpose,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """What embeddings cost (current prices in pgembed.models), anomalies today, cache savings.

    Example: pgembed costs --days 30 --by cost-center
    """
    with connect(dsn, embedded) as conn:
        rows = cost_views.spend(conn, days, by)
        anomalies = cost_views.anomalies(conn)
        cache = cost_views.cache(conn)
    if as_json:  # the views' rows, keyed by their columns
        print_json({"days": days, "by": by.value, "spend": rows, "anomalies": anomalies, "cache": cache})
        return
    out.print(tables.spend(rows, days, by))
    if anomalies:
        out.print(tables.anomalies(anomalies))
    out.print(tables.cache(cache))
