"""The README's SQLAlchemy mapping of a destination table works as written."""

from __future__ import annotations

import numpy as np
import psycopg
from pgvector.sqlalchemy import Vector
from sqlalchemy import BigInteger, Integer, Text, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgembed import pipelines
from pgembed.providers.hashing import hash_vector
from pgembed.search import model_spec, query_vector
from tests.conftest import drain


class Base(DeclarativeBase): ...


class ArticleVector(Base):
    __tablename__ = "articles_h64"
    __table_args__ = {"schema": "pgembed"}  # noqa: RUF012 - SQLAlchemy's own idiom
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    chunk_seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    chunk: Mapped[str] = mapped_column(Text)
    embedding = mapped_column(Vector(64))


def test_orm_nearest_neighbours(conn, dsn):
    conn.execute("CREATE TABLE articles (id bigint PRIMARY KEY, body text)")
    conn.execute("INSERT INTO articles VALUES (1, 'bread and butter'), (2, 'stars and planets')")
    pipelines.create(conn, "articles", "body", "hash:64")
    drain(dsn)
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    spec = model_spec(conn, "hash:64", 64)  # the README's way to the question's vector
    question = query_vector(conn, spec, "planets", "articles_h64")
    assert np.allclose(question, hash_vector("planets", 64), atol=1e-6)
    nearest = select(ArticleVector.id, ArticleVector.embedding.cosine_distance(question)
                     .label("distance")).order_by("distance").limit(5)
    with Session(engine) as session:
        rows = session.execute(nearest).all()
    engine.dispose()
    assert [r.id for r in rows] == [2, 1]
