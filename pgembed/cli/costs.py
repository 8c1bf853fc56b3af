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
    by: Annotated[Grouping, typer.Option(
        help="Group by purpose, cost center, or the caller's user, task or source.")] = Grouping.purpose,
    top: Annotated[int | None, typer.Option(
        min=1, help="Only the N biggest spenders (with --by user, task or source).")] = None,
    share: Annotated[bool, typer.Option(
        "--share", help="Per day, the share of spend that is indexing and that is queries.")] = False,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """What embeddings cost (current prices in pgembed.models), anomalies today, cache savings.

    Example: pgembed costs --days 30 --by user --top 10
    """
    if top is not None and len(by.keys) > 1:
        raise typer.BadParameter("ranks users, tasks or sources: give --by user, task or source", param_hint="--top")
    with connect(dsn, embedded) as conn:
        if share:
            days_rows = cost_views.share(conn, days)
        else:
            rows = cost_views.spend(conn, days, by, top)
            anomalies = cost_views.anomalies(conn)
            source_anomalies = cost_views.source_anomalies(conn)
            cache = cost_views.cache(conn)
    if share:
        if as_json:
            print_json({"days": days, "share": days_rows})
        else:
            out.print(tables.share(days_rows, days))
        return
    if as_json:  # the views' rows, keyed by their columns
        print_json({"days": days, "by": by.value, "top": top, "spend": rows, "anomalies": anomalies,
                    "source_anomalies": source_anomalies, "cache": cache})
        return
    out.print(tables.spend(rows, days, by))
    if anomalies:
        out.print(tables.anomalies(anomalies))
    if source_anomalies:
        out.print(tables.anomalies(source_anomalies, ("source", "task")))
    out.print(tables.cache(cache))
