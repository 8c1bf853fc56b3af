"""A pipeline's retrieval quality on a BEIR-format corpus, next to exact search with the
same model, measured in one run.

The pipeline is driven only through the public interface: a table, `pgembed.create_pipeline`
with default options (so with its default HNSW index and chunking), a worker until the
queue is empty, `Client.search`. The references embed with the same model, brute force in
numpy (exact cosine): over each whole document (what the model reads of it, cut at its
window), and over the very chunks the pipeline stored, a document scoring as its best chunk
(max-sim). The pipeline can only match the chunked reference: what it adds is the index.

The data is read from a directory given by the caller (corpus.jsonl, a queries file, a qrels
TSV); pgembed itself ships none.
"""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgembed.client import Client
from pgembed.evaluation.metrics import Qrels, Run, evaluate
from pgembed.sqlfiles import query


@dataclass
class Corpus:
    docs: dict[str, tuple[str, str]]  # id -> (title, text)
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


@dataclass
class Quality:
    pipeline: dict[str, float]
    whole_documents: dict[str, float]
    chunks: dict[str, float]
    failures: int
    documents: int
    chunk_count: int
    queries: int
    seconds: dict[str, float] = field(default_factory=dict)


def load(directory: Path, qrels_file: str = "qrels-train.tsv", queries_file: str = "queries-train.jsonl",
         *, max_docs: int | None = None) -> Corpus:
    """The corpus, the queries that have qrels, and their qrels. With `max_docs`: the
    documents the qrels name first, then others up to that many, and only the queries whose
    relevant documents are all kept (so every query can be answered fully)."""
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with open(directory / qrels_file, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    docs = {}
    with open(directory / "corpus.jsonl") as f:
        for line in f:
            d = json.loads(line)
            docs[d["_id"]] = (d.get("title", ""), d["text"])
    with open(directory / queries_file) as f:
        queries = {q["_id"]: q["text"] for q in map(json.loads, f) if q["_id"] in qrels}
    if max_docs is not None:
        docs, qrels = _sample(docs, qrels, queries, max_docs)
    queries = {q: t for q, t in queries.items() if q in qrels}
    return Corpus(docs, queries, dict(qrels))


def _sample(docs: dict[str, tuple[str, str]], qrels: dict[str, dict[str, int]], queries: dict[str, str],
            max_docs: int) -> tuple[dict[str, tuple[str, str]], dict[str, dict[str, int]]]:
    """Queries in id order while their documents fit in half the budget, then filler."""
    keep: dict[str, None] = {}
    kept_qrels = {}
    for q in sorted(queries, key=lambda q: int(q) if q.isdigit() else q):
        wanted = [d for d in qrels[q] if d in docs]
        if len(keep) + len(wanted) > max_docs // 2:
            break
        keep.update(dict.fromkeys(wanted))
        kept_qrels[q] = qrels[q]
    for d in docs:
        if len(keep) >= max_docs:
            break
        keep.setdefault(d)
    return {d: docs[d] for d in keep}, kept_qrels


def _ranked(scores: np.ndarray, ids: Sequence[str], k: int) -> list[list[str]]:
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in top]


def max_sim_run(query_vectors: np.ndarray, qids: Sequence[str], chunk_vectors: np.ndarray,
                chunks: Sequence[tuple[str, str]], k: int = 10) -> Run:
    """Exact search over chunks, a document scoring as its best chunk (max-sim)."""
    owners = sorted({doc for doc, _ in chunks})
    column = np.searchsorted(np.array(owners), [doc for doc, _ in chunks])
    best = np.full((len(qids), len(owners)), -np.inf, dtype=np.float32)
    np.maximum.at(best.T, column, (query_vectors @ chunk_vectors.T).T)
    return dict(zip(qids, _ranked(best, owners, k), strict=True))


def exact_runs(encode: Any, corpus: Corpus, chunks: list[tuple[str, str]], k: int = 10,
               whole_documents: bool = True) -> tuple[Run, Run]:
    """Brute-force runs with the same model: whole documents (empty when not asked for:
    encoding them is the dearest part), and max-sim over `chunks` ((document id, chunk
    text), the pipeline's own)."""
    qids = list(corpus.queries)
    q = encode([corpus.queries[i] for i in qids])
    whole: Run = {}
    if whole_documents:
        d = encode([f"{t} {b}" for t, b in corpus.docs.values()])
        whole = dict(zip(qids, _ranked(q @ d.T, list(corpus.docs), k), strict=True))
    return whole, max_sim_run(q, qids, encode([text for _, text in chunks]), chunks, k)


def load_table(conn: psycopg.Connection, table: str, corpus: Corpus) -> None:
    conn.execute(sql.SQL(query("evaluation_table")).format(table=sql.Identifier(table)))
    with conn.cursor().copy(sql.SQL(query("evaluation_copy")).format(table=sql.Identifier(table))) as copy:
        for doc, (title, body) in corpus.docs.items():
            copy.write_row((doc, title, body))


def pipeline_run(dsn: str, corpus: Corpus, model: str, table: str = "beir_docs",
                 k: int = 10) -> tuple[Run, list[tuple[str, str]], int, dict[str, float]]:
    """Table, default pipeline, worker, search: the pipeline's run, its stored chunks, its
    failure count and the seconds each stage took."""
    seconds = {}
    with Client(dsn) as client:
        started = time.perf_counter()
        load_table(client.conn, table, corpus)
        row = client.conn.execute(query("evaluation_pipeline"), {"table": table, "model": model}).fetchone()
        assert row is not None
        name = str(row[0])
        seconds["create"] = time.perf_counter() - started
        started = time.perf_counter()
        client.sync()
        seconds["drain"] = time.perf_counter() - started
        counted = client.conn.execute(query("evaluation_failures"), {"pipeline": name}).fetchone()
        failures = int(counted[0]) if counted else 0
        chunks = [(str(r[0]), r[1]) for r in client.conn.execute(
            sql.SQL(query("evaluation_chunks")).format(destination=sql.Identifier(name))).fetchall()]
        started = time.perf_counter()
        run = {q: [str(h.key["id"]) for h in client.search(name, text, k=k)] for q, text in corpus.queries.items()}
        seconds["search"] = time.perf_counter() - started
    return run, chunks, failures, seconds


def measure(dsn: str, corpus: Corpus, model: str, encode: Any, whole_documents: bool = True) -> Quality:
    """Every figure of one run: the pipeline's, and the references' over the same texts."""
    run, chunks, failures, seconds = pipeline_run(dsn, corpus, model)
    started = time.perf_counter()
    whole, chunked = exact_runs(encode, corpus, chunks, whole_documents=whole_documents)
    seconds["reference"] = time.perf_counter() - started
    qrels: Qrels = corpus.qrels
    return Quality(evaluate(qrels, run), evaluate(qrels, whole), evaluate(qrels, chunked), failures,
                   len(corpus.docs), len(chunks), len(corpus.queries), seconds)
