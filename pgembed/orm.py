"""A pipeline's tables for SQLAlchemy: the destination and the source reflected, and a
`select()` of the nearest chunks joined to their source rows on the key.

An application that maps its own tables with SQLAlchemy should not hand-map pgembed's:
the destination's name, its key columns and the distance operator are the pipeline's, and
reflection reads them from pgembed.pipelines. The select orders by the pipeline's own
distance over the stored vectors, as the HNSW or IVFFlat index does, so PostgreSQL reads
it through the index (a binary-quantized index orders by bits: pgembed.search reranks).
It returns chunks: a row cut into several chunks can come back more than once
(pgembed.search, or `Client.search`, gives one hit per row).

    from pgembed import orm
    with engine.connect() as connection:
        rows = connection.execute(orm.nearest(connection, "articles_h384", vector, k=5)).all()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pgvector.sqlalchemy  # noqa: F401 - registers vector, halfvec for reflection
from sqlalchemy import Column, Connection, MetaData, Select, Table, and_, select
from sqlalchemy.sql.elements import ColumnElement

from pgembed.pipelines import PipelineError
from pgembed.sqlfiles import query

# pgembed's distance names, as pgvector's SQLAlchemy comparators spell them
_DISTANCES = {"cosine": "cosine_distance", "l2": "l2_distance", "ip": "max_inner_product"}


@dataclass(frozen=True)
class PipelineTables:
    """A pipeline's destination and source tables, reflected, and how they join."""

    destination: Table
    source: Table
    key: tuple[str, ...]
    distance: str  # cosine, l2 or ip

    def distance_to(self, vector: Sequence[float]) -> ColumnElement[float]:
        """The pipeline's distance from each stored chunk to `vector` (ip: negated inner
        product, pgvector's <#>, smaller is nearer like the others)."""
        embedding: Column = self.destination.c.embedding
        return getattr(embedding, _DISTANCES[self.distance])(vector)

    def nearest(self, vector: Sequence[float], k: int = 10) -> Select:
        """The k nearest chunks with their source rows: every source column, then chunk_seq,
        chunk and distance, nearest first. The chunks are read first (ORDER BY distance
        LIMIT k on the destination alone, which the vector index answers whatever the
        planner thinks of the join), then joined to their rows."""
        if k < 1:
            raise ValueError("k must be at least 1")
        d, s = self.destination, self.source
        distance = self.distance_to(vector).label("distance")
        chunks = (select(*(d.c[name] for name in self.key), d.c.chunk_seq, d.c.chunk, distance)
                  .order_by(distance).limit(k).subquery("nearest"))
        return (select(s, chunks.c.chunk_seq, chunks.c.chunk, chunks.c.distance)
                .join_from(chunks, s, and_(*(s.c[name] == chunks.c[name] for name in self.key)))
                .order_by(chunks.c.distance))


def reflect(connection: Connection, pipeline: str, metadata: MetaData | None = None) -> PipelineTables:
    """The tables of `pipeline`, reflected through `connection` into `metadata` (a new one
    when not given; pass the application's to join its mapped classes)."""
    row = connection.exec_driver_sql(query("orm_pipeline"), {"name": pipeline}).first()
    if row is None:
        raise PipelineError(f'no pipeline named "{pipeline}" (pgembed pipeline list shows them)')
    metadata = metadata if metadata is not None else MetaData()
    source = Table(row.source_table, metadata, schema=row.source_schema, autoload_with=connection)
    destination = Table(row.destination, metadata, schema="pgembed", autoload_with=connection)
    return PipelineTables(destination, source, tuple(row.key_columns), row.distance)


def nearest(connection: Connection, pipeline: str, vector: Sequence[float], k: int = 10) -> Select:
    """`reflect(connection, pipeline).nearest(vector, k)`: the select for one question."""
    return reflect(connection, pipeline).nearest(vector, k)
