"""Retrieval quality through a real pipeline and worker with the local model (issue 13):
a few hundred SciFact documents whose qrels cover a set of train queries, a default
`create_pipeline` on `local:all-MiniLM-L6-v2`, a worker until empty, `Client.search`.
The pipeline must come within TOLERANCE nDCG@10 of exact search (numpy, same model) over
the very chunks it stored, measured in the same run, with no failure: nothing is lost to
chunking, the index or search grouping. The full corpus is `python -m benchmarks --only quality`."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgembed.evaluation import beir
from pgembed.evaluation.metrics import evaluate, ndcg, precision, recall, reciprocal_rank

pytestmark = pytest.mark.local_model

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
TOLERANCE = 0.01


def test_metrics_on_a_known_ranking():
    relevant = {"a": 1, "c": 2}
    ranked = ["b", "c", "a", "d"]
    assert ndcg(relevant, ranked, 10) == pytest.approx((2 / 1.5849625 + 1 / 2) / (2 + 1 / 1.5849625))
    assert recall(relevant, ranked, 1) == 0 and recall(relevant, ranked, 5) == 1
    assert precision(relevant, ranked, 5) == pytest.approx(0.4)
    assert reciprocal_rank(relevant, ranked, 10) == 0.5
    # a query the run did not answer counts, as 0
    assert evaluate({"q1": relevant, "q2": {"x": 1}}, {"q1": ranked})["mrr@10"] == 0.25


@pytest.mark.skipif(not SCIFACT.exists(), reason="needs the SciFact data in ../shared/data")
def test_a_default_local_pipeline_matches_exact_search_on_scifact(empty_dsn):
    from pgembed import migrate
    from pgembed.providers.local import load_model, resolve_model

    migrate.upgrade(empty_dsn)
    model = load_model(resolve_model("all-MiniLM-L6-v2"))
    corpus = beir.load(SCIFACT, max_docs=100)
    assert len(corpus.queries) >= 25

    def encode(texts):
        return model.encode(texts)

    quality = beir.measure(empty_dsn, corpus, "local:all-MiniLM-L6-v2", encode, whole_documents=False)
    assert quality.failures == 0
    assert quality.chunk_count > quality.documents, "long abstracts were not chunked"
    assert abs(quality.pipeline["ndcg@10"] - quality.chunks["ndcg@10"]) <= TOLERANCE, quality
