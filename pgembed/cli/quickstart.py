"""`pgembed quickstart`: the demo, ending on the status a user would look at next."""

from __future__ import annotations

from typing import Annotated

import typer

from pgembed import quickstart as demo
from pgembed.cli.common import DsnOption, friendly, out, target
from pgembed.cli.health import status


@friendly
def quickstart(
    model: Annotated[str | None, typer.Option(help="Model to use (default: the best available).")] = None,
    dsn: DsnOption = None,
) -> None:
    """Semantic search in one command: sample data, a pipeline, a drain, two searches.

    On the embedded PostgreSQL unless --dsn or PGEMBED_DSN names a database.

    Example: pgembed quickstart
    """
    chosen = target(dsn, embedded=not dsn)  # a demo's sample table goes nowhere unasked
    demo.run(chosen, out, model)
    out.print()
    status(dsn=chosen)
