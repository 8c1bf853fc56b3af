"""`pgembed init`: the schema, created or upgraded by the migrations installed with pgembed."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from pgembed import migrate
from pgembed.cli.common import DsnOption, EmbeddedOption, connect, friendly, out, target


@friendly
def init(
    sql: Annotated[bool, typer.Option(
        "--sql", help="Print the SQL the upgrade would run on this database, and change nothing "
                      "(for a change process that applies scripts by hand).")] = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Create or upgrade the pgembed schema. Safe to run again.

    Example: pgembed init --dsn postgresql://admin@db/app
    """
    if sql:
        with connect(dsn, embedded) as conn:
            sys.stdout.write(migrate.upgrade_sql(migrate.current_revision(conn)))
        return
    migrate.upgrade(target(dsn, embedded))
    out.print(f"pgembed schema at revision {migrate.head_revision()}")
