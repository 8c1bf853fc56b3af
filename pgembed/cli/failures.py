"""`pgembed failures`: the rows that could not be embedded, by pipeline and class, and putting
them back in the queue once the cause is fixed."""

from __future__ import annotations

import json
import sys
from itertools import groupby
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from pgembed import costs as cost_views
from pgembed import health
from pgembed.cli import tables
from pgembed.cli.common import DsnOption, connect, friendly, out

Row = dict[str, Any]
# The pipeline and class are each table's title and the error is printed under its key, so
# that the key and a whole timestamp fit on one line of 80 columns. A parked row was parked
# by its last failure (parked_at is last_failed_at); both times, and first_failed_at, are in
# --json.
COLUMNS = ("key, error", "tries", "last failed", "state")
NO_WRAP = frozenset({"tries", "last failed", "state"})


@friendly
def failures(
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline's failures.")] = None,
    failure_class: Annotated[str | None, typer.Option(
        "--class", help="Only failures of this class (input_rejected, too_long, content_error, "
                        "bad_vector, provider_unavailable, unknown).")] = None,
    retry: Annotated[bool, typer.Option("--retry", help="Re-queue the parked rows (of --class, --pipeline).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON document: the failures (times ISO 8601) and, with --retry, "
                       "how many were re-queued.")] = False,
    dsn: DsnOption = None,
) -> None:
    """Rows that could not be embedded, by class; --retry puts the parked ones back in the queue.

    Example: pgembed failures --class too_long --retry
    """
    with connect(dsn) as conn:
        rows = cost_views.failures(conn, pipeline, failure_class)
        policies = {c["class"]: c for c in cost_views.failure_classes(conn)}
        requeued = cost_views.retry_failures(conn, pipeline, failure_class) if retry else None
    if as_json:
        document = {"failures": rows, "requeued": requeued}
        sys.stdout.write(json.dumps(document, default=health.as_json, indent=2) + "\n")
        return
    if not rows:
        out.print("no failures", highlight=False)
    for (name, kind), group in groupby(sorted(rows, key=_group), key=_group):
        out.print(_table(name, kind, list(group), policies.get(kind)))
    if requeued is not None:
        out.print(f"{requeued} parked row{'' if requeued == 1 else 's'} re-queued", highlight=False)


def _group(row: Row) -> tuple[str, str]:
    return row["pipeline"], row["class"]


def _table(pipeline: str, kind: str, rows: list[Row], policy: Row | None) -> Table:
    """One pipeline's failures of one class. Times never wrap (a cut timestamp is a wrong
    one); the key and, under it, the error take the width that is left."""
    parked = sum(1 for r in rows if r["parked_at"] is not None)
    t = tables.table(f"{pipeline}: {kind}, {parked} parked, {len(rows) - parked} retrying", COLUMNS,
                     ([Text(", ".join(str(k) for k in r["key"])).append("\n" + r["error"], style="dim"),
                       r["attempts"], tables.when(r["last_failed_at"]),
                       "parked" if r["parked_at"] else "retrying"] for r in rows))
    t.box, t.pad_edge, t.caption, t.caption_justify = box.SIMPLE_HEAD, False, Text(_policy(policy)), "left"
    for column in t.columns:
        column.no_wrap = str(column.header) in NO_WRAP
        column.overflow = "fold"
    return t


def _policy(policy: Row | None) -> str:
    """The class's retry policy in a few words, so the reader knows what happens next."""
    if policy is None:
        return ""
    after = policy["park_after"]
    parks = f"parked after {after} attempt{'' if after == 1 else 's'}" if after else "parked after --max-attempts"
    retry = ("the schedule retries them" if policy["auto_retry"]
             else f"pgembed failures --retry --class {policy['class']}")
    return f"{parks}; {retry}"
