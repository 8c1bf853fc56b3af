"""`eval run` through a real pipeline (issue 14): a SciFact slice (100 documents, or
PGEMBED_TEST_EVAL_DOCS) and their
train queries, imported from BEIR files, searched through an alias with the local MiniLM
model. The run's nDCG@10 must equal, within TOLERANCE (what the HNSW index may lose), the one
pgembed.evaluation.metrics gives on exact numpy search over the very chunks the pipeline
stored, computed in this test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pgembed import aliases, db, migrate
from pgembed.evaluation import beir, runs, sets
from pgembed.evaluation.metrics import evaluate
from pgembed.sqlfiles import query
from tests.conftest import drain

pytestmark = pytest.mark.local_model

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
MODEL = "local:all-MiniLM-L6-v2"
TOLERANCE = 0.02


def write_slice(corpus: beir.Corpus, directory: Path) -> tuple[Path, Path]:
    """The slice's queries and qrels as BEIR files, the form `pgembed eval import` reads."""
    queries, qrels = directory / "queries.jsonl", directory / "qrels.tsv"
    queries.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in corpus.queries.items()))
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{score}\n" for q, docs in corpus.qrels.items() for d, score in docs.items()))
    return queries, qrels


@pytest.mark.skipif(not SCIFACT.exists(), reason="needs the SciFact data in ../shared/data")
def test_an_eval_run_matches_exact_search_over_the_stored_chunks(empty_dsn, tmp_path):
    from pgembed.providers.local import load_model, resolve_model

    migrate.upgrade(empty_dsn)
    corpus = beir.load(SCIFACT, max_docs=int(os.environ.get("PGEMBED_TEST_EVAL_DOCS", "100")))
    assert len(corpus.queries) >= 40
    with db.connect(empty_dsn) as conn:
        beir.load_table(conn, "scifact", corpus)
        row = conn.execute(query("evaluation_pipeline"), {"table": "scifact", "model": MODEL}).fetchone()
        assert row is not None
        pipeline = str(row[0])
        drain(empty_dsn)
        aliases.set_alias(conn, "papers", pipeline)
        imported = sets.import_set(conn, "scifact-train", "scifact", sets.read_beir(*write_slice(corpus, tmp_path)))
        assert imported == len(corpus.queries)
        run = runs.run_evaluation(conn, "papers", "scifact-train")
        chunks = [(str(r[0]), r[1]) for r in conn.execute(f'SELECT id, chunk FROM pgembed."{pipeline}" '
                                                          "ORDER BY id, chunk_seq").fetchall()]
    model = load_model(resolve_model("all-MiniLM-L6-v2"))
    _, exact = beir.exact_runs(model.encode, corpus, chunks, whole_documents=False)
    reference = evaluate(corpus.qrels, exact)
    assert run.pipeline == pipeline and len(chunks) > len(corpus.docs)  # long abstracts were chunked
    assert abs(run.metrics["ndcg@10"] - reference["ndcg@10"]) <= TOLERANCE, (run.metrics, reference)
    assert run.metrics["ndcg@10"] > 0.3  # not two zeros agreeing
    print(f"{len(corpus.docs)} documents, {len(chunks)} chunks, {len(corpus.queries)} queries; "
          f"eval run {run.metrics}; exact {reference}")
