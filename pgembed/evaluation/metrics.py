"""IR metrics over ranked lists, as BEIR reports them (graded gains, linear, log2 discount).

`qrels` maps a query id to {document id: relevance}; `run` maps a query id to its ranked
document ids, best first. Every query that has qrels counts: one that the run left out, or
that found nothing relevant, scores 0, so a system cannot look better by answering less.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Sequence[str]]


def ndcg(relevant: Mapping[str, int], ranked: Sequence[str], k: int) -> float:
    """nDCG@k of one query: DCG of the ranking over DCG of the ideal ranking."""
    gains = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    if ideal == 0:
        return 0.0
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    return dcg / ideal


def recall(relevant: Mapping[str, int], ranked: Sequence[str], k: int) -> float:
    wanted = {d for d, g in relevant.items() if g > 0}
    return len(wanted.intersection(ranked[:k])) / len(wanted) if wanted else 0.0


def precision(relevant: Mapping[str, int], ranked: Sequence[str], k: int) -> float:
    return sum(1 for d in ranked[:k] if relevant.get(d, 0) > 0) / k


def reciprocal_rank(relevant: Mapping[str, int], ranked: Sequence[str], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if relevant.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def ranking(scores: Mapping[str, float]) -> list[str]:
    """Document ids best first, from scores: ties go to the greater id, as trec_eval (and so
    ir-measures) breaks them, so that a scored run has one ranking and everyone's numbers."""
    return [d for d, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def evaluate(qrels: Qrels, run: Run, ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """The means over every query of `qrels`: nDCG@10, and Recall@k, P@k and MRR@k for each
    k of `ks`."""
    if not ks or min(ks) < 1:
        raise ValueError(f"every k must be 1 or more, not {list(ks)}")
    measures: dict[str, tuple[Callable[[Mapping[str, int], Sequence[str], int], float], int]] = {
        "ndcg@10": (ndcg, 10)}
    for k in sorted(set(ks)):
        measures |= {f"recall@{k}": (recall, k), f"p@{k}": (precision, k), f"mrr@{k}": (reciprocal_rank, k)}
    n = max(len(qrels), 1)
    return {name: sum(f(rel, run.get(q, []), k) for q, rel in qrels.items()) / n
            for name, (f, k) in measures.items()}
