"""Reads the SQL in sql/: whole files for migrations, named queries for the worker.

queries.sql holds blocks that start with a `-- name --` line; Python refers to a query by
its name, so every statement the worker runs can be read (and EXPLAINed) by a DBA.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME = re.compile(r"^-- ([a-z_]+) --\s*$", re.MULTILINE)


def read_sql(filename: str) -> str:
    return resources.files("pgembed._sql").joinpath(filename).read_text(encoding="utf-8")


@cache
def queries() -> dict[str, str]:
    parts = _NAME.split(read_sql("queries.sql"))
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str) -> str:
    return queries()[name]
