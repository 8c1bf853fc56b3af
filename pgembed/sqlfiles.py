"""Reads the SQL in sql/: whole files for migrations, named queries for the Python code.

queries.sql holds blocks that start with a `-- name --` line; Python refers to a query by
its name, so every statement pgembed runs can be read (and EXPLAINed) by a DBA. The loader
is strict: a duplicate name, a block with no statement, a header whose name is not
lowercase snake_case, or stray text before the first block is an error naming the line,
not a query that silently goes missing or runs the wrong text.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

QUERIES_FILE = "sql/queries.sql"

# Any "-- something --" line is a header; its name must then match _VALID_NAME.
_HEADER = re.compile(r"^-- (.*\S) --\s*$")
_VALID_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class QueryFileError(ValueError):
    """queries.sql (or text parsed like it) is malformed; the message names file and line."""

    def __init__(self, filename: str, line: int, message: str) -> None:
        super().__init__(f"{filename}:{line}: {message}")
        self.filename = filename
        self.line = line


class UnknownQueryError(KeyError):
    """query() was asked for a name queries.sql does not define."""

    def __str__(self) -> str:  # KeyError's own str() would quote the whole sentence
        return str(self.args[0]) if self.args else ""


def _text(filename: str) -> str:
    return resources.files("pgembed._sql").joinpath(filename).read_text(encoding="utf-8")


def read_sql(filename: str) -> str:
    return _text(filename)


def _is_code(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("--")


def parse_queries(text: str, filename: str = QUERIES_FILE) -> dict[str, str]:
    """Maps each `-- name --` block of `text` to its statement (comments kept, trimmed).

    Raises QueryFileError for a duplicate name, an empty body (only comments and blank
    lines), a header whose name does not match ^[a-z][a-z0-9_]*$, or anything but comments
    and blank lines before the first header."""
    found: dict[str, str] = {}
    name: str | None = None
    start = 0
    body: list[str] = []

    def close() -> None:
        if name is None:
            return
        if not any(_is_code(line) for line in body):
            raise QueryFileError(filename, start, f'query "{name}" has an empty body')
        found[name] = "\n".join(body).strip()

    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header is None:
            if name is None:
                if _is_code(line):
                    raise QueryFileError(filename, number,
                                         "text before the first `-- name --` block must be comments")
            else:
                body.append(line)
            continue
        close()
        candidate = header.group(1).strip()
        if not _VALID_NAME.match(candidate):
            raise QueryFileError(filename, number,
                                 f'cannot parse query name "{candidate}" '
                                 "(expected lowercase letters, digits and _, starting with a letter)")
        if candidate in found:
            raise QueryFileError(filename, number, f'duplicate query name "{candidate}"')
        name, start, body = candidate, number, []
    close()
    return found


@cache
def queries() -> dict[str, str]:
    return parse_queries(_text("queries.sql"))


def query(name: str) -> str:
    try:
        return queries()[name]
    except KeyError:
        raise UnknownQueryError(f'no query named "{name}" in {QUERIES_FILE}') from None
