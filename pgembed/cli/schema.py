"""`pgembed init`: the schema, created or upgraded by the migrations installed with pgembed."""

from __future__ import annotations

from pgembed import migrate
from pgembed.cli.common import DsnOption, friendly, out, target


@friendly
def init(dsn: DsnOption = None) -> None:
    """Create or upgrade the pgembed schema. Safe to run again.

    Example: pgembed init --dsn postgresql://admin@db/app
    """
    migrate.upgrade(target(dsn))
    out.print(f"pgembed schema at revision {migrate.head_revision()}")
