"""Pipeline creation: what is refused, with which message, and that a refusal changes nothing."""

from __future__ import annotations

import psycopg
import pytest

from pgembed import pipelines
from pgembed.pipelines import PipelineError, PipelineOptions


def snapshot(conn: psycopg.Connection) -> tuple:
    return conn.execute(
        "SELECT (SELECT count(*) FROM pgembed.pipelines), "
        "(SELECT count(*) FROM pg_class WHERE relnamespace = 'pgembed'::regnamespace), "
        "(SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgembed'::regnamespace), "
        "(SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal), "
        "(SELECT count(*) FROM pgembed.outbox), to_regclass('public.pwned') IS NULL").fetchone()


@pytest.fixture
def docs(conn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs VALUES (1, 'one'), (2, 'two')")
    conn.execute("CREATE TABLE secrets (v text)")
    conn.execute("CREATE TABLE nokey (body text)")
    return conn


@pytest.mark.parametrize(("table", "content", "model", "options", "message"), [
    ("nokey", "body", "hash:8", PipelineOptions(), "has no primary key"),
    ("docs", "nope", "hash:8", PipelineOptions(), 'column "nope" does not exist'),
    ("docs", "body", "openai:no-such-model", PipelineOptions(), "unknown model"),
    ("docs", "body", "hash:3000", PipelineOptions(), "at most 2000 dimensions"),
    ("docs", "body", "openai:text-embedding-ada-002", PipelineOptions(dimensions=256), "exactly"),
    ("docs", "body", "hash:8", PipelineOptions(index="btree"), "index must be"),
    ("docs", "body", "hash:8", PipelineOptions(distance="manhattan"), "distance must be"),
    ("docs", "body", "hash:8", PipelineOptions(chunk_tokens=10, chunk_overlap=10), "chunk_tokens"),
    ("docs", "body", "hash:8", PipelineOptions(index_options={"lists": 5}), "hnsw index options"),
    ("docs", "body) FROM docs; CREATE TABLE pwned (x int); SELECT (1", "hash:8", PipelineOptions(),
     "multi-query"),
    ("docs", "(SELECT v FROM secrets LIMIT 1)", "hash:8", PipelineOptions(), "only columns of"),
    ("docs", "(SELECT relname FROM pg_class LIMIT 1)", "hash:8", PipelineOptions(), "subquery"),
    ("docs", "", "hash:8", PipelineOptions(), "must be a SQL expression"),
    ("no_such_table", "body", "hash:8", PipelineOptions(), "does not exist"),
])
def test_bad_pipelines_are_refused_and_change_nothing(docs, table, content, model, options, message):
    before = snapshot(docs)
    with pytest.raises(PipelineError, match=message):
        pipelines.create(docs, table, content, model, options)
    assert snapshot(docs) == before


def index_of(conn: psycopg.Connection, table: str) -> tuple[str, str, list[str]]:
    return conn.execute(
        "SELECT am.amname, opc.opcname, c.reloptions FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
        "JOIN pg_opclass opc ON opc.oid = i.indclass[0] "
        "WHERE i.indrelid = format('pgembed.%%I', %s::text)::regclass AND NOT i.indisprimary",
        (table,)).fetchone()


def test_ivfflat_l2_and_options(docs):
    name = pipelines.create(docs, "docs", "body", "hash:8",
                            PipelineOptions(index="ivfflat", index_options={"lists": 2}, distance="l2"))
    assert index_of(docs, name) is None, "built by a worker once there are rows to train it on"
    plan = docs.execute("SELECT create_sql FROM pgembed.deferred_index_plan() JOIN pgembed.deferred_indexes "
                        "USING (pipeline) WHERE pipeline = %s", (name,)).fetchone()
    assert plan is None, "the table is empty: nothing to build yet"
    hnsw = pipelines.create(docs, "docs", "body", "hash:16",
                            PipelineOptions(index_options={"m": 8, "ef_construction": 32}, distance="ip"))
    assert index_of(docs, hnsw) == ("hnsw", "vector_ip_ops", ["m=8", "ef_construction=32"])
    default = pipelines.create(docs, "docs", "body", "hash:32")
    assert index_of(docs, default)[:2] == ("hnsw", "vector_cosine_ops")
    none = pipelines.create(docs, "docs", "body", "hash:4", PipelineOptions(index="none"))
    assert index_of(docs, none) is None


def test_destination_names_are_deterministic_and_fit_63_bytes(conn):
    long = "t" * 60
    conn.execute(f"CREATE TABLE {long} (id int PRIMARY KEY, body text)")
    first = pipelines.create(conn, long, "body", "hash:8")
    second = pipelines.create(conn, long, "upper(body)", "hash:8")
    assert len(first.encode()) <= 63 and len(second.encode()) <= 63
    assert first != second and first.endswith("_h8")
    shorter = pipelines.create(conn, long, "body", "openai:text-embedding-3-small",
                               PipelineOptions(dimensions=256, backfill=False))
    assert shorter.endswith("_te3s_256")
    conn.execute("CREATE TABLE \"ünïcødé_table_with_a_rather_long_name_that_goes_on\" (id int PRIMARY KEY, b text)")
    name = pipelines.create(conn, '"ünïcødé_table_with_a_rather_long_name_that_goes_on"', "b",
                            "openai:text-embedding-3-large", PipelineOptions(dimensions=1024))
    assert len(name.encode()) <= 63
    name.encode().decode()  # never cut inside a character


def test_backfill_off_queues_nothing_and_drop_of_unknown_pipeline_is_clear(docs):
    pipelines.create(docs, "docs", "body", "hash:8", PipelineOptions(backfill=False))
    assert docs.execute("SELECT count(*) FROM pgembed.outbox").fetchone()[0] == 0
    with pytest.raises(PipelineError, match='no pipeline named "nope"'):
        pipelines.drop(docs, "nope")


def test_content_uses_the_creators_search_path(conn, dsn):
    conn.execute("CREATE SCHEMA app")
    conn.execute("CREATE FUNCTION app.shout(t text) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT upper(t)'")
    conn.execute("CREATE TABLE app.posts (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO app.posts VALUES (1, 'quiet')")
    conn.execute("SET search_path = app, public")
    name = pipelines.create(conn, "posts", "shout(body)", "hash:8")
    conn.execute("RESET search_path")
    from tests.conftest import drain

    drain(dsn)
    assert conn.execute(f'SELECT chunk FROM pgembed."{name}"').fetchall() == [("QUIET",)]
