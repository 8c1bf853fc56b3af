"""`pgembed alias set|list|drop`: the names applications search through (sql/aliases.sql).
A repoint is one transaction: searches go on, answered by the old pipeline or the new."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer
from rich.markup import escape

from pgembed import aliases
from pgembed.cli import tables
from pgembed.cli.common import (
    EXIT_USAGE,
    DsnOption,
    EmbeddedOption,
    JsonOption,
    connect,
    fail,
    friendly,
    out,
    print_dropped,
    print_json,
    print_rows,
)
from pgembed.pipelines import PipelineError
from pgembed.scheduler import parse_duration

alias_app = typer.Typer(no_args_is_help=True, help="Names to search through that outlive their pipelines.")


@alias_app.command("set")
@friendly
def set_alias(
    name: str,
    pipeline: str,
    eval_set: Annotated[str | None, typer.Option(
        "--eval-set", help="An evaluation set (pgembed eval sets) the scheduler re-runs on this alias.")] = None,
    every: Annotated[str, typer.Option(help="How often it re-runs the set: 7d, 12h, off.")] = "7d",
    threshold: Annotated[float, typer.Option(
        min=0, help="A drop in nDCG@10 beyond this, run to run, is listed as a regression.")] = 0.02,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Point NAME at PIPELINE (creating it, or repointing it in one transaction).

    Example: pgembed alias set articles articles_h384 --eval-set scifact
    """
    try:
        seconds = parse_duration(every)
    except ValueError as error:
        fail(error, EXIT_USAGE)
    with connect(dsn, embedded) as conn:
        try:
            with conn.transaction():  # the repoint and its evaluation settings, together
                aliases.set_alias(conn, name, pipeline)
                if eval_set is not None:
                    aliases.set_evaluation(conn, name, eval_set,
                                           None if seconds is None else dt.timedelta(seconds=seconds), threshold)
        except PipelineError as error:
            fail(error, EXIT_USAGE)
        [row] = [a for a in aliases.list_all(conn) if a["name"] == name]
    if as_json:
        print_json(row)
        return
    was = f" (was {escape(row['previous'])})" if row["previous"] else ""
    out.print(f"{escape(name)} -> {escape(row['pipeline'])}{was}", highlight=False)


@alias_app.command("list")
@friendly
def list_aliases(as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Every alias, the pipeline it points at and the one before.

    Example: pgembed alias list
    """
    with connect(dsn, embedded) as conn:
        rows = aliases.list_all(conn)
    print_rows(rows, as_json, tables.aliases,
               "no aliases; make one with pgembed alias set NAME PIPELINE")


@alias_app.command("drop")
@friendly
def drop(name: str, as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Drop an alias (and its view); its pipeline stays.

    Example: pgembed alias drop articles
    """
    with connect(dsn, embedded) as conn:
        try:
            aliases.drop(conn, name)
        except PipelineError as error:
            fail(error, EXIT_USAGE)
    print_dropped("alias", name, as_json)
