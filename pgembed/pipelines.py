"""Pipeline administration: thin calls of the SQL functions in sql/functions.sql.

All validation lives in SQL, so `psql` users and Python users get the same checks; this
module turns a refused call into a PipelineError carrying PostgreSQL's message and hint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg


class PipelineError(Exception):
    """PostgreSQL refused a pipeline operation; the message says why."""


@dataclass(frozen=True)
class PipelineOptions:
    dimensions: int | None = None
    index: str = "hnsw"
    index_options: dict[str, int] | None = None
    distance: str = "cosine"
    chunk_tokens: int = 0
    chunk_overlap: int = 0
    backfill: bool = True
    cost_center: str | None = None
    name: str | None = None


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
        "cost_center": o.cost_center, "name": o.name,
    }
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT pgembed.create_pipeline(source => %(source)s::regclass, "
                "content => %(content)s, model => %(model)s, dimensions => %(dimensions)s, "
                "index => %(index)s, index_options => %(index_options)s::jsonb, "
                "distance => %(distance)s, chunk_tokens => %(chunk_tokens)s, "
                "chunk_overlap => %(chunk_overlap)s, backfill => %(backfill)s, "
                "cost_center => %(cost_center)s, name => %(name)s)", params).fetchone()
    except psycopg.Error as error:
        raise refused(error) from error
    assert row is not None
    return str(row[0])


def drop(conn: psycopg.Connection, name: str) -> None:
    try:
        with conn.transaction():
            conn.execute("SELECT pgembed.drop_pipeline(%s)", (name,))
    except psycopg.Error as error:
        raise refused(error) from error


def list_all(conn: psycopg.Connection) -> list[dict[str, Any]]:
    cur = conn.execute(
        "SELECT name, source::text AS source, content, model, dimensions, index_type, distance, "
        "chunk_tokens, (SELECT count(*) FROM pgembed.outbox o WHERE o.pipeline = p.name) "
        "+ pgembed.statement_keys(p.name) AS queued "
        "FROM pgembed.pipelines p ORDER BY name")
    names = [c.name for c in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def get(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    cur = conn.execute(
        "SELECT name, destination, distance, key_columns, model, dimensions, index_type "
        "FROM pgembed.pipelines WHERE name = %s", (name,))
    row = cur.fetchone()
    if row is None:
        raise PipelineError(f'no pipeline named "{name}" (pgembed pipeline list shows them)')
    return dict(zip([c.name for c in cur.description or []], row, strict=True))
