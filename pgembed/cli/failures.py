"""`pgembed failures`: the rows that could not be embedded, and putting them back in the queue
once the cause is fixed."""

from __future__ import annotations

from typing import Annotated

import typer

from pgembed import costs as cost_views
from pgembed.cli import tables
from pgembed.cli.common import DsnOption, connect, friendly, out


@friendly
def failures(
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline's failures.")] = None,
    retry: Annotated[bool, typer.Option("--retry", help="Re-queue the parked rows.")] = False,
    dsn: DsnOption = None,
) -> None:
    """Rows that could not be embedded; --retry puts the parked ones back in the queue.

    Example: pgembed failures --pipeline articles_te3s --retry
    """
    with connect(dsn) as conn:
        rows = cost_views.failures(conn, pipeline)
        requeued = cost_views.retry_failures(conn, pipeline) if retry else None
    out.print(tables.failures(rows))
    if requeued is not None:
        out.print(f"{requeued} parked row{'' if requeued == 1 else 's'} re-queued")
