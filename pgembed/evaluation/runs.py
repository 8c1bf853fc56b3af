"""Evaluation runs: an evaluation set's queries searched through the path users get
(`pgembed.search.search`, so pgembed.search in SQL), scored, and stored as one
pgembed.eval_runs row.

The target (an alias or a pipeline) is resolved once: every query of a run is embedded by,
and searched in, the same pipeline even if the alias is repointed meanwhile. The query
embeddings are usage like any search's (purpose `query`), with cost center `eval:<set>`, so
the cost views show what evaluation spends; the run records their tokens.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgembed import aliases, pipelines
from pgembed.evaluation.metrics import evaluate
from pgembed.providers import ProviderError
from pgembed.search import search
from pgembed.sqlfiles import query

NDCG_DEPTH = 10  # nDCG is reported at 10 whatever ks say


@dataclass(frozen=True)
class EvalRun:
    id: int
    target: str
    pipeline: str
    model: str
    eval_set: str
    metrics: dict[str, float]


def key_id(key: Mapping[str, Any]) -> str:
    """One string per row key, equal for the judgments' keys and the hits' (both are JSON
    objects of the same typed primary key columns, from PostgreSQL)."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _scalar(conn: psycopg.Connection, name: str, params: dict[str, Any] | None = None) -> Any:
    row = conn.execute(query(name), params or {}).fetchone()
    return row[0] if row else None


def run_evaluation(conn: psycopg.Connection, target: str, eval_set: str, ks: Sequence[int] = (5, 10),
                   *, scheduled: bool = False) -> EvalRun:
    """Searches every query of `eval_set` on `target`, stores the run and returns it."""
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"every k must be 1 or more, not {list(ks)}")
    answering = aliases.pipeline_of(conn, target)
    pipeline, model = str(answering["name"]), str(answering["model"])
    questions = conn.execute(query("eval_queries"), {"eval_set": eval_set}).fetchall()
    if not questions:
        raise pipelines.PipelineError(f"no evaluation set named {eval_set!r} (pgembed eval sets lists them)")
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for query_id, key, relevance in conn.execute(query("eval_judgments"), {"eval_set": eval_set}):
        qrels[query_id][key_id(key)] = relevance
    cost_center = f"eval:{eval_set}"
    mark = _scalar(conn, "eval_usage_mark")
    depth = max(NDCG_DEPTH, *ks)
    started = time.perf_counter()
    ranked = {query_id: [key_id(hit.key) for hit in search(conn, pipeline, text, depth, cost_center)]
              for query_id, text in questions}
    seconds = time.perf_counter() - started
    metrics = evaluate({q: qrels.get(q, {}) for q, _ in questions}, ranked, ks)
    tokens = _scalar(conn, "eval_usage_tokens", {"mark": mark, "pipeline": pipeline, "cost_center": cost_center})
    with conn.transaction():
        run_id = _scalar(conn, "eval_run_insert", {
            "target": target, "pipeline": pipeline, "model": model, "eval_set": eval_set,
            "metrics": Jsonb(metrics), "ks": ks, "queries": len(questions), "query_tokens": int(tokens or 0),
            "cost_center": cost_center, "seconds": seconds, "scheduled": scheduled})
    return EvalRun(int(run_id), target, pipeline, model, eval_set, metrics)


def evaluate_due(conn: psycopg.Connection) -> str:
    """The scheduler's evaluation job: every alias whose set is due (none of its runs within
    its period) is run once; what each scored, and an error naming those that could not run
    (they are due again at the next look)."""
    notes, failed = [], []
    for alias, eval_set in conn.execute(query("eval_due")).fetchall():
        try:
            done = run_evaluation(conn, alias, eval_set, scheduled=True)
        except (pipelines.PipelineError, ProviderError) as error:
            failed.append(f"{alias} on {eval_set}: {error}")
            continue
        notes.append(f"{alias} on {eval_set}: nDCG@10 {done.metrics['ndcg@10']:.4f}")
    if failed:
        raise pipelines.PipelineError("; ".join(failed + notes))
    return "; ".join(notes) or "no evaluation due"


def latest_run(conn: psycopg.Connection, pipeline: str, eval_set: str) -> EvalRun | None:
    """The newest run of `eval_set` that `pipeline` answered (whether asked by its name or
    through an alias)."""
    row = conn.execute(query("eval_latest"), {"pipeline": pipeline, "eval_set": eval_set}).fetchone()
    if row is None:
        return None
    run_id, target, answered, model, set_name, metrics = row
    return EvalRun(int(run_id), target, answered, model, set_name, {k: float(v) for k, v in metrics.items()})


def history(conn: psycopg.Connection, target: str | None = None, eval_set: str | None = None) -> list[dict[str, Any]]:
    """Runs oldest first (pgembed.eval_history), of one target (alias or pipeline, asked or
    answering) and one set when given."""
    return conn.cursor(row_factory=dict_row).execute(
        query("eval_history"), {"target": target, "eval_set": eval_set}).fetchall()


def regressions(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Runs whose nDCG@10 fell beyond their threshold since the run before (pgembed.eval_regressions)."""
    return conn.cursor(row_factory=dict_row).execute(query("eval_regressions")).fetchall()
