"""9. Retrieval quality (issue 13): SciFact (5,183 abstracts, the 809 train queries) in a
table, `create_pipeline('beir_docs', 'title || '' '' || body', 'local:all-MiniLM-L6-v2')` with
default options (default chunking, HNSW index), a worker until empty, `Client.search` for
every query. References in the same run, same model, exact cosine in numpy: whole
documents (the model reads their first 256 tokens), and max-sim over the very chunks the
pipeline stored. Target: the pipeline within 0.01 nDCG@10 of the chunked reference, no
failures.

Skipped when the data (../shared/data/scifact, or PGEMBED_BENCH_DATA) or the local model is
not there.
"""

from __future__ import annotations

import time

from benchmarks.harness import DATA, Bench, Result, at_most, ratio

NAME = "quality"
MODEL = "local:all-MiniLM-L6-v2"
TOLERANCE = 0.01


def _skipped(why: str) -> list[Result]:
    return [Result(NAME, "", None, "", status="skipped", note=why)]


def run(bench: Bench) -> list[Result]:
    directory = DATA / "scifact"
    if not (directory / "corpus.jsonl").exists():
        return _skipped(f"no SciFact corpus in {directory}")
    try:
        from pgembed.providers.local import load_model, resolve_model

        model = load_model(resolve_model("all-MiniLM-L6-v2"))
    except Exception as error:  # no local extra: nothing to measure
        return _skipped(f"local model unavailable: {error}")
    from pgembed.evaluation import beir

    corpus = beir.load(directory, max_docs=bench.scale.quality_docs or None)

    def encode(texts: list[str]):
        return model.encode(texts)

    started = time.perf_counter()
    with bench.database() as dsn:
        quality = beir.measure(dsn, corpus, MODEL, encode)
    wall = time.perf_counter() - started
    gap = abs(quality.pipeline["ndcg@10"] - quality.chunks["ndcg@10"])
    details = {"pipeline": quality.pipeline, "exact_whole_documents": quality.whole_documents,
               "exact_same_chunks": quality.chunks, "failures": quality.failures,
               "documents": quality.documents, "chunks": quality.chunk_count, "queries": quality.queries,
               "seconds": quality.seconds, "wall_seconds": wall}
    bench.log(f"quality: {details}")
    figure = quality.pipeline["ndcg@10"]
    note = (f"{quality.documents} docs, {quality.chunk_count} chunks, {quality.queries} queries; "
            f"failures {quality.failures}; Recall@5 {quality.pipeline['recall@5']:.4f}, "
            f"MRR@10 {quality.pipeline['mrr@10']:.4f}, P@5 {quality.pipeline['p@5']:.4f}; {wall:.0f} s")
    return [
        Result(NAME, "nDCG@10 vs exact search over the same chunks", figure, "nDCG@10",
               limit=quality.chunks["ndcg@10"], limit_unit="nDCG@10", limit_label="exact, same chunks",
               ratio=ratio(figure, quality.chunks["ndcg@10"]), target="within 0.01, 0 failures",
               met=at_most(gap, TOLERANCE) and quality.failures == 0, note=note, details=details),
        Result(NAME, "nDCG@10 vs exact search over whole documents", figure, "nDCG@10",
               limit=quality.whole_documents["ndcg@10"], limit_unit="nDCG@10",
               limit_label="exact, whole documents (cut at 256 tokens)",
               ratio=ratio(figure, quality.whole_documents["ndcg@10"])),
    ]
