"""pgembed.orm: a pipeline's tables reflected for SQLAlchemy and the nearest-chunks select,
against the real database: the same rows and distances as pgembed.search for rows of one
chunk, through the vector index, for each distance."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import create_engine

from pgembed import orm, pipelines, search
from pgembed.pipelines import PipelineError
from pgembed.providers.hashing import hash_vector
from tests.conftest import drain


@pytest.fixture
def engine(dsn):
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    yield engine
    engine.dispose()


@pytest.mark.parametrize("distance", ["cosine", "l2", "ip"])
def test_nearest_matches_pgembed_search_for_rows_of_one_chunk(conn, dsn, engine, distance):
    conn.execute('CREATE SCHEMA "App Data"')
    conn.execute('CREATE TABLE "App Data".articles (region text, id int, title text NOT NULL, '
                 "PRIMARY KEY (region, id))")
    conn.execute("""INSERT INTO "App Data".articles SELECT CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g,
                    'article ' || g || ' on tides' FROM generate_series(1, 200) g""")
    name = pipelines.create(conn, '"App Data".articles', "title", "hash:32",
                            pipelines.PipelineOptions(distance=distance))
    drain(dsn)
    question = hash_vector("article 17 on tides", 32)
    expected = search.search(conn, name, vector=question, k=8)
    with engine.connect() as connection:
        tables = orm.reflect(connection, name)
        assert tables.key == ("region", "id") and tables.destination.schema == "pgembed"
        select = tables.nearest(question, k=8)
        rows = connection.execute(select).all()
        connection.exec_driver_sql("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in connection.exec_driver_sql(
            "EXPLAIN " + str(select.compile(connection, compile_kwargs={"literal_binds": True}))))
    assert "Index Scan using articles_h32_embedding_idx" in plan, plan
    assert [r.distance for r in rows] == pytest.approx([h.distance for h in expected], abs=1e-6)
    # the hash model's vectors tie often: the rows nearer than the last distance are the same
    last = expected[-1].distance - 1e-6
    assert ({(r.region, r.id) for r in rows if r.distance < last}
            == {(h.key["region"], h.key["id"]) for h in expected if h.distance < last})
    assert [r.chunk for r in rows] == [r.title for r in rows]


def test_an_unknown_pipeline_or_a_bad_k_is_refused(engine):
    with engine.connect() as connection, pytest.raises(PipelineError, match='no pipeline named "nope"'):
        orm.nearest(connection, "nope", [0.0] * 4)
    with pytest.raises(ValueError, match="k must be at least 1"):
        orm.PipelineTables(*[None] * 4).nearest([0.0], k=0)  # type: ignore[arg-type]
