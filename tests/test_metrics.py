"""pgembed.evaluation.metrics against an established implementation, ir-measures (trec_eval
through pytrec_eval for nDCG, P and R; the MS MARCO script for RR@k), on fixed rankings:
graded gains, judged-irrelevant rows, relevant rows never retrieved, rankings shorter than
k, and tied scores."""

from __future__ import annotations

import ir_measures
import pytest
from ir_measures import RR, P, R, nDCG

from pgembed.evaluation.metrics import evaluate, ranking

KS = (1, 3, 5, 10)

QRELS = {
    "q1": {"d1": 1, "d4": 2, "d9": 0},
    "q2": {"d2": 3, "d3": 1, "d7": 1, "d8": 0},
    "q3": {"d5": 1},  # never retrieved
    "q4": {"d6": 2, "d1": 1},
}

# scores with ties: q1 ties d1 with d9 and d4 with d2, q2 d2 with d5, q4 d1 with d6
SCORES = {
    "q1": {"d9": 0.9, "d1": 0.9, "d3": 0.7, "d4": 0.5, "d2": 0.5, "d8": 0.1},
    "q2": {"d7": 0.8, "d2": 0.6, "d5": 0.6, "d3": 0.2, "d1": 0.1, "d6": 0.05, "d4": 0.04, "d9": 0.03,
           "d10": 0.02, "d11": 0.01, "d8": 0.0},
    "q3": {"d1": 1.0, "d2": 0.5},
    "q4": {"d1": 0.3, "d6": 0.3, "d0": 0.2, "d2": 0.1},
}


def measures():
    return [nDCG @ 10] + [m @ k for k in KS for m in (P, R, RR)]


def name(measure) -> str:
    return {"nDCG": "ndcg", "P": "p", "R": "recall", "RR": "mrr"}[measure.NAME] + f"@{measure['cutoff']}"


def theirs(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    qrels = [ir_measures.Qrel(q, d, rel) for q, docs in QRELS.items() for d, rel in docs.items()]
    run = [ir_measures.ScoredDoc(q, d, s) for q, docs in scores.items() for d, s in docs.items()]
    return {name(m): v for m, v in ir_measures.calc_aggregate(measures(), qrels, run).items()}


def strict(ranked: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """A ranking as scores without ties, so that no tie rule can matter."""
    return {q: {d: float(len(docs) - i) for i, d in enumerate(docs)} for q, docs in ranked.items()}


def test_every_measure_matches_ir_measures_on_a_fixed_ranking():
    ranked = {q: ranking(s) for q, s in SCORES.items()}
    ours = evaluate(QRELS, ranked, KS)
    assert set(ours) == {name(m) for m in measures()}
    assert ours == pytest.approx(theirs(strict(ranked)), abs=1e-9)


def test_ties_are_broken_as_trec_eval_breaks_them():
    """Tied scores given to trec_eval as they are give our numbers on `ranking`'s order (the
    greater id first). The MS MARCO script behind RR@k breaks ties the other way, so RR is
    checked on the strict ranking above only."""
    ranked = {q: ranking(s) for q, s in SCORES.items()}
    assert ranked["q1"][:2] == ["d9", "d1"] and ranked["q4"][:2] == ["d6", "d1"]
    ours = evaluate(QRELS, ranked, KS)
    tied = theirs(SCORES)
    for key in ours:
        if not key.startswith("mrr@"):
            assert ours[key] == pytest.approx(tied[key], abs=1e-9), key
    # and the ties decide something: the other rule (the smaller id first) gives other numbers
    other = {q: [d for d, _ in sorted(s.items(), key=lambda item: (-item[1], item[0]))] for q, s in SCORES.items()}
    changed = evaluate(QRELS, other, KS)
    assert {"ndcg@10", "p@1", "recall@1"} <= {key for key in tied if abs(changed[key] - tied[key]) > 1e-6}


def test_a_query_left_out_of_the_run_counts_as_zero():
    ranked = {q: ranking(s) for q, s in SCORES.items() if q != "q2"}
    ours, full = evaluate(QRELS, ranked, KS), evaluate(QRELS, {q: ranking(s) for q, s in SCORES.items()}, KS)
    q2 = evaluate({"q2": QRELS["q2"]}, {"q2": ranking(SCORES["q2"])}, KS)
    for key in ours:
        assert ours[key] == pytest.approx(full[key] - q2[key] / len(QRELS)), key


def test_ks_must_be_positive():
    with pytest.raises(ValueError, match="every k must be 1 or more"):
        evaluate(QRELS, {}, (0, 5))
