"""13. The local model at its speed: a drain with `local:all-MiniLM-L6-v2` against the rate
of the model's own `encode` on the very texts the pipeline embedded, in this process.

SciFact abstracts (`local_docs` of them) go into a table; a default pipeline (chunking that
fits the model, HNSW) and an in-process worker embed them: chunks per second of the drain.
Then the chunks it stored are read back and encoded again, in batches of 32 as the
provider's runtime does, with nothing else around: the limit, what a CPU embedder can do
at all. The drain must reach 0.9 of it. The same chunks through the numpy runtime
(pgembed/providers/bert.py, no torch) give its rate against torch's, when torch is there.

Skipped without the data (../shared/data/scifact) or the local model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import DATA, Bench, Result, at_least, connect, drain, ratio, worker_config

NAME = "local_model"
MODEL = "local:all-MiniLM-L6-v2"


def _skipped(why: str) -> list[Result]:
    return [Result(NAME, "", None, "", status="skipped", note=why)]


def _docs(path: Path, n: int) -> list[tuple[int, str, str]]:
    with path.open(encoding="utf-8") as lines:
        rows = [json.loads(line) for _, line in zip(range(n), lines, strict=False)]
    return [(i, r.get("title", ""), r["text"]) for i, r in enumerate(rows, 1)]


def _rate(encode: Any, texts: list[str]) -> float:
    encode(texts[:8])  # warm: first calls allocate
    started = time.perf_counter()
    encode(texts)
    return len(texts) / (time.perf_counter() - started)


def run(bench: Bench) -> list[Result]:
    corpus = DATA / "scifact" / "corpus.jsonl"
    if not corpus.exists():
        return _skipped(f"no SciFact corpus at {corpus}")
    try:
        from pgembed.providers.local import load_model, resolve_model, runtime

        source = resolve_model("all-MiniLM-L6-v2")
        model = load_model(source)
    except Exception as error:  # no local extra: nothing to measure
        return _skipped(f"local model unavailable: {error}")
    docs = _docs(corpus, bench.scale.local_docs)
    with bench.database() as dsn, connect(dsn) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text)")
        with conn.cursor().copy("COPY docs (id, title, body) FROM STDIN") as copy:
            for row in docs:
                copy.write_row(row)
        name = conn.execute("SELECT pgembed.create_pipeline('docs', $$title || ' ' || body$$, %s)",
                            (MODEL,)).fetchone()[0]
        drained = drain(dsn, worker_config(bench.scale))
        chunks = [r[0] for r in conn.execute(f'SELECT chunk FROM pgembed."{name}" ORDER BY id, chunk_seq')]
    pipeline = len(chunks) / drained.seconds
    limit = _rate(model.encode, chunks)
    r = ratio(pipeline, limit)
    details = {"documents": len(docs), "chunks": len(chunks), "drain_s": round(drained.seconds, 2),
               "runtime": runtime()}
    results = [Result(NAME, f"drain {len(docs)} abstracts", pipeline, "chunks/s", limit, "chunks/s",
                      f"{runtime()} encode, same chunks", r, "≥ 0.9 × encode", at_least(r, 0.9), details=details)]
    if runtime() == "torch":
        from pgembed.providers.bert import BertEncoder

        numpy = _rate(BertEncoder(Path(source)).encode, chunks)
        results.append(Result(NAME, "numpy runtime encode", numpy, "chunks/s", limit, "chunks/s",
                              "torch encode, same chunks", ratio(numpy, limit), "reported", None))
    return results
