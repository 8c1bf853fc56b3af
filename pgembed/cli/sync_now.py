"""`pgembed sync-now`: embed rows an application just wrote, now, and say when they are
searchable (pgembed.writethrough)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from pgembed.cli import tables
from pgembed.cli.common import (
    EXIT_ERROR,
    EXIT_USAGE,
    DsnOption,
    EmbeddedOption,
    JsonOption,
    fail,
    friendly,
    out,
    print_json,
    target,
)
from pgembed.writethrough import WriteThroughError, sync_keys


@friendly
def sync_now(
    pipeline: str,
    keys: list[str],
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds to wait at most.")] = 30.0,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Embed and store these keys of a pipeline (or alias) now instead of waiting for a worker.

    Each KEY is the primary key's value; a key of several columns is a JSON list. Exits 1
    when a key is not searchable yet (failed, or still held or queued at the timeout): the
    row stays queued and a worker embeds it.

    Example: pgembed sync-now articles 42 43 '["eu", "7"]'
    """
    parsed = [_key(k) for k in keys]
    try:
        result = asyncio.run(sync_keys(target(dsn, embedded), pipeline, parsed, timeout=timeout))
    except WriteThroughError as error:
        fail(error, EXIT_USAGE)
    if as_json:
        print_json(result.as_dict())
    else:
        out.print(tables.sync_outcomes(result))
    if not result.ok:
        raise typer.Exit(EXIT_ERROR)


def _key(text: str) -> object:
    """A JSON list is a key of several columns; anything else is one column's value."""
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            fail(f"key {text!r} starts like a JSON list but is not one: e.g. '[\"eu\", \"7\"]'", EXIT_USAGE)
    return text
