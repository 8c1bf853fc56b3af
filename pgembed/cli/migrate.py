"""`pgembed migrate plan|start|status|evaluate|cutover|rollback|cleanup`: moving an alias
to another model while its searches go on (pgembed/model_migrations.py)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer
from rich.markup import escape

from pgembed import model_migrations as mm
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
    print_json,
)
from pgembed.scheduler import parse_duration

migrate_app = typer.Typer(no_args_is_help=True, help="Move an alias to another model, in five phases.")

AliasArgument = Annotated[str, typer.Argument(metavar="ALIAS", help="The alias searches use.")]
ModelOption = Annotated[str, typer.Option(help="The model to migrate to, e.g. local:all-MiniLM-L6-v2.")]
DimensionsOption = Annotated[int | None, typer.Option(help="Its output dimensions (Matryoshka).")]


@migrate_app.command("plan")
@friendly
def plan(alias: AliasArgument, model: ModelOption, dimensions: DimensionsOption = None,
         as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """The dry run: rows, chunks, tokens in the new model's tokenizer, what the cache holds
    already (free), spend at the model's price, time at the rate budget. Nothing is paid.

    Example: pgembed migrate plan articles --model local:all-MiniLM-L6-v2
    """
    with connect(dsn, embedded) as conn:
        e = mm.plan(conn, alias, model, dimensions)
    if as_json:
        print_json({"alias": alias, "model": model, **e.as_json()})
        return
    out.print(tables.estimate(f"{alias} → {model}: dry run", e))


@migrate_app.command("start")
@friendly
def start(alias: AliasArgument, model: ModelOption, dimensions: DimensionsOption = None,
          name: Annotated[str | None, typer.Option(help="The shadow pipeline's name.")] = None,
          max_drop: Annotated[float, typer.Option(
              help="Cutover refuses a shadow more than this many points below the active on any metric.")]
          = mm.DEFAULT_MAX_DROP,
          window: Annotated[str, typer.Option(help="How long rollback stays possible after cutover.")] = "48h",
          as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Create the shadow pipeline (every live change is embedded by both models from now
    on) and queue its backfill in the bulk lane, behind live changes.

    Example: pgembed migrate start articles --model local:all-MiniLM-L6-v2
    """
    try:
        seconds = parse_duration(window)
    except ValueError:
        seconds = None
    if not seconds:
        fail(f"--window must be a duration like 48h or 2d, not {window!r}", EXIT_USAGE)
    with connect(dsn, embedded) as conn:
        migration, e = mm.start(conn, alias, model, dimensions, name=name, max_drop=max_drop,
                                window=dt.timedelta(seconds=seconds))
        shadow = mm.status(conn, alias)[0]["to_pipeline"]
    if as_json:
        print_json({"migration": migration, "alias": alias, "shadow": shadow, "estimate": e.as_json()})
        return
    out.print(f"migration #{migration} started: shadow pipeline [bold]{escape(shadow)}[/bold], "
              f"{e.rows:,} rows queued for the bulk lane", highlight=False)
    out.print(tables.estimate("estimate", e))


@migrate_app.command("status")
@friendly
def status(alias: Annotated[str | None, typer.Argument(metavar="[ALIAS]", help="One alias (default: all).")] = None,
           as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Each migration: phase, rows done of the estimate, ETA, spend so far against the
    estimate, until when rollback is possible.

    Example: pgembed migrate status articles
    """
    with connect(dsn, embedded) as conn:
        rows = mm.status(conn, alias)
        history = mm.events(conn, rows[0]["id"]) if rows and alias else []
    if as_json:
        print_json({"migrations": rows, "events": history})
        return
    out.print(tables.migrations(rows))
    for e in history:
        out.print(f"{tables.when(e['at'])}  {e['event']:<15} by {escape(e['by_user'])}", highlight=False)


@migrate_app.command("evaluate")
@friendly
def evaluate(alias: AliasArgument,
             eval_set: Annotated[str | None, typer.Option(help="Evaluation set (default: the alias's).")] = None,
             as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Run the evaluation set against the active and the shadow pipeline, for the gate.

    Example: pgembed migrate evaluate articles
    """
    with connect(dsn, embedded) as conn:
        result = mm.evaluate(conn, alias, eval_set)
    if as_json:
        print_json({"migration": result.migration, "eval_set": result.eval_set, "active": result.active,
                    "shadow": result.shadow})
        return
    out.print(tables.metrics_compared(f"{alias}: {result.eval_set}", result.active, result.shadow))


@migrate_app.command("cutover")
@friendly
def cutover(alias: AliasArgument,
            force: Annotated[bool, typer.Option("--force", help="Cut over even if the gate refuses.")] = False,
            reason: Annotated[str | None, typer.Option(help="Why, with --force (recorded).")] = None,
            as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Point the alias at the shadow, unless a metric of the shadow is more than the gate's
    points below the active's or the shadow still misses rows (exit 1, recorded). The old
    pipeline stays live and in sync, for rollback.

    Example: pgembed migrate cutover articles
    """
    with connect(dsn, embedded) as conn:
        verdict = mm.cutover(conn, alias, force=force, reason=reason)
    if as_json:
        print_json(verdict)
    elif verdict["cut_over"]:
        forced = " (forced)" if verdict["forced"] else ""
        out.print(f"alias {escape(alias)} cut over{forced}; rollback possible for the window", highlight=False)
    else:
        if verdict["failed"]:
            out.print(tables.gate_failures(verdict["failed"]))
        if not verdict["evaluated"]:
            out.print(f"no evaluation since the start: pgembed migrate evaluate {escape(alias)}", highlight=False)
        out.print(f"shadow: {verdict['missing']:,} missing, {verdict['stale']:,} stale rows", highlight=False)
    if not verdict["cut_over"]:
        fail(f"cutover of {alias} refused by the gate (max drop {verdict['max_drop']} points); "
             "--force --reason WHY overrides")


@migrate_app.command("rollback")
@friendly
def rollback(alias: AliasArgument, as_json: JsonOption = False, dsn: DsnOption = None,
             embedded: EmbeddedOption = False) -> None:
    """Point the alias back at the old pipeline, at once (within the window).

    Example: pgembed migrate rollback articles
    """
    with connect(dsn, embedded) as conn:
        migration = mm.rollback(conn, alias)
    if as_json:
        print_json({"migration": migration, "alias": alias, "rolled_back": True})
        return
    out.print(f"alias {escape(alias)} rolled back (migration #{migration})", highlight=False)


@migrate_app.command("cleanup")
@friendly
def cleanup(alias: AliasArgument, as_json: JsonOption = False, dsn: DsnOption = None,
            embedded: EmbeddedOption = False) -> None:
    """Drop the pipeline the alias no longer uses, and its vectors; ends the migration (the
    scheduled cleanup does this once the rollback window is over).

    Example: pgembed migrate cleanup articles
    """
    with connect(dsn, embedded) as conn:
        dropped = mm.cleanup(conn, alias)
    if as_json:
        print_json({"alias": alias, "dropped": dropped})
        return
    out.print(f"pipeline {escape(dropped)} dropped; migration of {escape(alias)} finished", highlight=False)
