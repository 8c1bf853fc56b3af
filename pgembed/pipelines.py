"""Pipeline administration: thin calls of the SQL functions in sql/functions.sql.

All validation lives in SQL, so `psql` users and Python users get the same checks; this
module turns a refused call into a PipelineError carrying PostgreSQL's message and hint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg

from pgembed.sqlfiles import query


class PipelineError(Exception):
    """PostgreSQL refused a pipeline operation; the message says why."""


@dataclass(frozen=True)
class PipelineOptions:
    dimensions: int | None = None
    index: str = "hnsw"
    index_options: dict[str, int] | None = None
    distance: str = "cosine"
    # None: what fits the model (pgembed.chunking_settings); chunk_tokens 0 alone: no chunking
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    backfill: bool = True
    cost_center: str | None = None
    name: str | None = None
    chunking: str | None = None
    chunk_prefix: str | None = None  # an expression embedded at the head of every chunk
    storage: str = "vector"  # or "halfvec": half the size, indexed up to 4,000 dimensions
    quantization: str = "none"  # or "binary": an HNSW index of bits, searches re-ranked
    rerank: int | None = None  # binary: candidates read per row returned (10 when None)
    late_chunking: bool = False  # local models: each chunk pooled from one run over its document


def refused(error: psycopg.Error) -> PipelineError:
    diag = error.diag
    message = diag.message_primary or str(error).splitlines()[0]
    if diag.message_hint:
        message = f"{message} ({diag.message_hint})"
    return PipelineError(message.removeprefix("pgembed: "))


def create(conn: psycopg.Connection, source: str, content: str, model: str,
           options: PipelineOptions | None = None) -> str:
    o = options or PipelineOptions()
    params: dict[str, Any] = {
        "source": source, "content": content, "model": model, "dimensions": o.dimensions,
        "index": o.index, "index_options": json.dumps(o.index_options or {}),
        "distance": o.distance, "chunk_tokens": o.chunk_tokens,
        "chunk_overlap": o.chunk_overlap, "backfill": o.backfill,
        "cost_center": o.cost_center, "name": o.name, "chunking": o.chunking,
        "chunk_prefix": o.chunk_prefix, "storage": o.storage, "quantization": o.quantization,
        "rerank": o.rerank, "late_chunking": o.late_chunking,
    }
    try:
        with conn.transaction():
            row = conn.execute(query("pipeline_create"), params).fetchone()
    except psycopg.Error as error:
        raise refused(error) from error
    assert row is not None
    return str(row[0])


def same(conn: psycopg.Connection, source: str, content: str, model: str, dimensions: int | None) -> list[str]:
    """Pipelines that already embed this content of this table with this model: a second
    one would embed and pay for every row again, under a `_2` name nobody asked for."""
    try:
        rows = conn.execute(query("pipeline_same"), {"source": source, "content": content, "model": model,
                                                    "dimensions": dimensions}).fetchall()
    except psycopg.Error as error:
        raise refused(error) from error
    return [str(r[0]) for r in rows]


def drop(conn: psycopg.Connection, name: str) -> None:
    try:
        with conn.transaction():
            conn.execute(query("pipeline_drop"), {"name": name})
    except psycopg.Error as error:
        raise refused(error) from error


def list_all(conn: psycopg.Connection) -> list[dict[str, Any]]:
    cur = conn.execute(query("pipeline_list"))
    names = [c.name for c in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def get(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    cur = conn.execute(query("pipeline_get"), {"name": name})
    row = cur.fetchone()
    if row is None:
        raise PipelineError(f'no pipeline named "{name}" (pgembed pipeline list shows them)')
    return dict(zip([c.name for c in cur.description or []], row, strict=True))
