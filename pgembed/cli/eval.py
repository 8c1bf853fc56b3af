"""`pgembed eval import|run|history|regressions|sets|drop`: evaluation sets and the runs
that measure a pipeline, or the pipeline behind an alias, on them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

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
from pgembed.evaluation import runs, sets
from pgembed.pipelines import PipelineError

eval_app = typer.Typer(no_args_is_help=True, help="Evaluation sets, and runs that measure search quality on them.")



@eval_app.command("import")
@friendly
def import_set(
    name: str,
    source: Annotated[str, typer.Option(help="The table whose primary keys the judgments name.")],
    jsonl: Annotated[Path | None, typer.Option(
        dir_okay=False, help='One query a line: {"query", "relevant": [keys], "irrelevant": [keys]}.')] = None,
    queries: Annotated[Path | None, typer.Option(dir_okay=False, help="BEIR queries JSONL (_id, text).")] = None,
    qrels: Annotated[Path | None, typer.Option(
        dir_okay=False, help="BEIR qrels TSV (query-id, corpus-id, score).")] = None,
    replace: Annotated[bool, typer.Option(help="Replace a set of this name, and its runs.")] = False,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Import an evaluation set, whole or not at all.

    Example: pgembed eval import scifact --source papers --queries queries.jsonl --qrels qrels/test.tsv
    """
    try:
        if jsonl is not None and queries is None and qrels is None:
            found = sets.read_jsonl(jsonl)
        elif jsonl is None and queries is not None and qrels is not None:
            found = sets.read_beir(queries, qrels)
        else:
            raise sets.EvalSetError("give --jsonl FILE, or --queries FILE and --qrels FILE (BEIR)")
        with connect(dsn, embedded) as conn:
            count = sets.import_set(conn, name, source, found, replace=replace)
    except (sets.EvalSetError, PipelineError) as error:
        fail(error, EXIT_USAGE)
    judged = len(found.judgments)
    if as_json:
        print_json({"eval_set": name, "source": source, "queries": count, "judgments": judged})
    else:
        out.print(f"evaluation set {escape(name)}: {count:,} queries, {judged:,} judged rows of "
                  f"{escape(source)}", highlight=False)


@eval_app.command("run")
@friendly
def run(
    target: Annotated[str, typer.Argument(help="An alias or a pipeline.")],
    eval_set: Annotated[str, typer.Option("--set", help="The evaluation set (pgembed eval sets).")],
    k: Annotated[list[int] | None, typer.Option(
        "-k", min=1, help="Cut-offs of Recall, P and MRR (repeatable); nDCG is at 10.")] = None,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Search every query of a set through TARGET, score it, and store the run.

    Example: pgembed eval run articles --set scifact -k 5 -k 10
    """
    with connect(dsn, embedded) as conn:
        try:
            done = runs.run_evaluation(conn, target, eval_set, k or (5, 10))
        except PipelineError as error:
            fail(error, EXIT_USAGE)
    if as_json:
        print_json({"id": done.id, "target": done.target, "pipeline": done.pipeline, "model": done.model,
                    "eval_set": done.eval_set, "metrics": done.metrics})
    else:
        via = "" if done.target == done.pipeline else f" through {escape(done.target)}"
        out.print(f"{escape(done.eval_set)} on {escape(done.pipeline)}{via} ({escape(done.model)}): "
                  f"nDCG@10 {done.metrics['ndcg@10']:.4f}", highlight=False)
        out.print(tables.eval_metrics(done))


@eval_app.command("history")
@friendly
def history(
    target: Annotated[str | None, typer.Argument(help="An alias or a pipeline; default: all.")] = None,
    eval_set: Annotated[str | None, typer.Option("--set", help="Only this evaluation set.")] = None,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Every run, oldest first, with the change in nDCG@10 since the run before it.

    Example: pgembed eval history articles --set scifact
    """
    with connect(dsn, embedded) as conn:
        rows = runs.history(conn, target, eval_set)
    print_rows(rows, as_json, tables.eval_history,
               "no evaluation runs yet; pgembed eval run ALIAS --set NAME makes one")


@eval_app.command("regressions")
@friendly
def regressions(as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Runs whose nDCG@10 fell beyond their alias's threshold since the run before.

    Example: pgembed eval regressions
    """
    with connect(dsn, embedded) as conn:
        rows = runs.regressions(conn)
    print_rows(rows, as_json, tables.eval_regressions,
               "no regressions")


@eval_app.command("sets")
@friendly
def list_sets(as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """The evaluation sets and what they hold.

    Example: pgembed eval sets
    """
    with connect(dsn, embedded) as conn:
        rows = sets.list_sets(conn)
    print_rows(rows, as_json, tables.eval_sets,
               "no evaluation sets; pgembed eval import NAME --source TABLE --jsonl FILE makes one")


@eval_app.command("drop")
@friendly
def drop(name: str, as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Drop an evaluation set and its runs.

    Example: pgembed eval drop scifact
    """
    with connect(dsn, embedded) as conn:
        try:
            sets.drop_set(conn, name)
        except PipelineError as error:
            fail(error, EXIT_USAGE)
    print_dropped("evaluation set", name, as_json)
