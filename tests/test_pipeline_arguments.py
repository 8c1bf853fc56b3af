"""Bad arguments of pgembed.create_pipeline get pgembed's own message (issue 11).

Each refusal is checked through SQL, as a psql user would call it (NULLs and JSON of any
shape included): the message starts with "pgembed:", says what is wrong, a hint says what is
allowed, and nothing was created: no pipeline row, no relation or function in schema
pgembed, no trigger on the source, no outbox row.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

# create_pipeline's arguments with their SQL types, in order
TYPES = {
    "source": "regclass", "content": "text", "model": "text", "dimensions": "int",
    "index": "text", "index_options": "jsonb", "distance": "text", "chunk_tokens": "int",
    "chunk_overlap": "int", "backfill": "boolean", "cost_center": "text", "name": "text",
    "chunking": "text",
}
BASE = {"source": "docs", "content": "body", "model": "hash:8"}


def create(conn: psycopg.Connection, **arguments: Any) -> str:
    args = {**BASE, **arguments}
    sql = ", ".join(f"{k} => %({k})s::{TYPES[k]}" for k in args)
    row = conn.execute(f"SELECT pgembed.create_pipeline({sql})", args).fetchone()
    assert row is not None
    return str(row[0])


def snapshot(conn: psycopg.Connection) -> tuple:
    return conn.execute(
        "SELECT (SELECT count(*) FROM pgembed.pipelines), "
        "(SELECT array_agg(relname ORDER BY relname) FROM pg_class "
        "  WHERE relnamespace = 'pgembed'::regnamespace), "
        "(SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgembed'::regnamespace), "
        "(SELECT count(*) FROM pg_trigger WHERE tgrelid = 'docs'::regclass AND NOT tgisinternal), "
        "(SELECT count(*) FROM pgembed.outbox)").fetchone()


def refused(conn: psycopg.Connection, message: str, **arguments: Any) -> psycopg.errors.Diagnostic:
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        create(conn, **arguments)
    diag = caught.value.diag
    assert diag.message_primary is not None and diag.message_primary.startswith("pgembed: "), diag.message_primary
    assert message in diag.message_primary, diag.message_primary
    assert diag.message_hint, f"no hint for {diag.message_primary!r}"
    assert snapshot(conn) == before
    return diag


@pytest.fixture
def docs(conn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs VALUES (1, 'one'), (2, 'two')")
    return conn


@pytest.mark.parametrize(("index", "options", "message"), [
    ("hnsw", "[1,2]", "index_options must be a JSON object, not an array"),
    ("hnsw", '"m=16"', "index_options must be a JSON object, not a string"),
    ("hnsw", "16", "index_options must be a JSON object, not a number"),
    ("hnsw", "null", "index_options must be a JSON object, not null"),
    ("hnsw", '{"m":"abc"}', 'hnsw index option m must be a whole number, not "abc"'),
    ("hnsw", '{"m":"16"}', 'hnsw index option m must be a whole number, not "16"'),
    ("hnsw", '{"m":1.5}', "hnsw index option m must be a whole number, not 1.5"),
    ("hnsw", '{"m":null}', "hnsw index option m must be a whole number, not null"),
    ("hnsw", '{"m":[16]}', "hnsw index option m must be a whole number, not [16]"),
    ("hnsw", '{"m":1}', "hnsw index option m must be from 2 to 100, not 1"),
    ("hnsw", '{"m":101}', "hnsw index option m must be from 2 to 100, not 101"),
    ("hnsw", '{"m":1e30}', "hnsw index option m must be from 2 to 100"),
    ("hnsw", '{"ef_construction":3}', "hnsw index option ef_construction must be from 4 to 1000, not 3"),
    ("hnsw", '{"ef_construction":1001}', "ef_construction must be from 4 to 1000, not 1001"),
    ("hnsw", '{"m":16,"ef_construction":31}', "ef_construction must be at least 2 * m (32), not 31"),
    ("hnsw", '{"m":40}', "ef_construction must be at least 2 * m (80), not 64 (the default)"),
    ("hnsw", '{"lists":5}', "hnsw index options are m, ef_construction, not lists"),
    ("hnsw", '{"m":16,"M":16}', "hnsw index options are m, ef_construction, not M"),
    ("ivfflat", '{"lists":0}', "ivfflat index option lists must be from 1 to 32768, not 0"),
    ("ivfflat", '{"lists":-3}', "ivfflat index option lists must be from 1 to 32768, not -3"),
    ("ivfflat", '{"lists":32769}', "ivfflat index option lists must be from 1 to 32768, not 32769"),
    ("ivfflat", '{"lists":true}', "ivfflat index option lists must be a whole number, not true"),
    ("ivfflat", '{"m":16}', "ivfflat index options are lists, not m"),
    ("ivfflat", "[]", "index_options must be a JSON object, not an array"),
    ("none", '{"m":16}', "index => 'none' takes no index_options"),
    ("none", '{"lists":10}', "index => 'none' takes no index_options"),
    ("none", "[1]", "index_options must be a JSON object, not an array"),
])
def test_bad_index_options(docs, index, options, message):
    refused(docs, message, index=index, index_options=options)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"source": None}, "source must name a table, not NULL"),
    ({"content": None}, "content must be a SQL expression over the columns of public.docs, not NULL"),
    ({"model": None}, "model must name a model, not NULL"),
    ({"distance": None}, "distance must be cosine, l2 or ip, not NULL"),
    ({"distance": "Cosine"}, "distance must be cosine, l2 or ip, not Cosine"),
    ({"index": None}, "index must be hnsw, ivfflat or none, not NULL"),
    ({"dimensions": 0}, "dimensions must be 1 or more, not 0"),
    ({"dimensions": -8}, "dimensions must be 1 or more, not -8"),
    ({"dimensions": 9}, "model hash:8 gives 8 dimensions or fewer; 9 is not possible"),
    ({"chunk_tokens": -1}, "chunking 'recursive' needs chunk_tokens of 1 or more, not -1"),
    ({"chunk_tokens": 0, "chunk_overlap": 5}, "chunking 'none' embeds the content whole"),
    ({"chunking": "none", "chunk_tokens": 100}, "chunking 'none' embeds the content whole"),
    ({"chunking": "semantic"}, "unknown chunking strategy 'semantic'"),
    ({"chunking": "recursive", "chunk_tokens": 0}, "chunking 'recursive' needs chunk_tokens of 1 or more"),
    ({"chunking": "markdown", "chunk_tokens": 100, "chunk_overlap": 100},
     "chunk_overlap must be 0 to chunk_tokens - 1 (99), not 100"),
    ({"chunk_tokens": 10, "chunk_overlap": 10}, "chunk_overlap must be 0 to chunk_tokens - 1 (9), not 10"),
    ({"chunking": "recursive", "chunk_overlap": -1}, "chunk_overlap must be 0 to chunk_tokens - 1"),
    ({"chunking": "truncate", "chunk_overlap": 5}, "chunking 'truncate' keeps one chunk"),
    ({"model": "local:all-MiniLM-L6-v2", "chunk_tokens": 300},
     "chunk_tokens 300 is more than model local:all-MiniLM-L6-v2 reads (256 tokens)"),
    ({"backfill": None}, "backfill must be true or false, not NULL"),
])
def test_bad_arguments(docs, arguments, message):
    refused(docs, message, **arguments)


@pytest.mark.parametrize(("name", "message"), [
    ("", "a pipeline name cannot be empty or blank"),
    ("   ", "a pipeline name cannot be empty or blank"),
    ("\t", "a pipeline name cannot be empty or blank"),
    ("x" * 64, "is 64 bytes long; pipeline names are at most 63 bytes"),
    ("é" * 32, "is 64 bytes long; pipeline names are at most 63 bytes"),
    ("two\nlines", r'pipeline name "two\nlines" contains a control character'),
    ("tab\there", r'pipeline name "tab\there" contains a control character'),
    ("cr\r", r'pipeline name "cr\r" contains a control character'),
    ("bell\x07", r'pipeline name "bell\u0007" contains a control character'),
    ("del\x7f", "contains a control character"),
    ("c1\x85", "contains a control character"),
    (" lead", 'pipeline name " lead" begins or ends with a space'),
    ("trail ", 'pipeline name "trail " begins or ends with a space'),
    ("outbox", 'pipeline name "outbox" is taken by pgembed\'s table pgembed.outbox'),
    ("pipelines", 'pipeline name "pipelines" is taken by pgembed\'s table pgembed.pipelines'),
    ("models", "is taken by pgembed's table pgembed.models"),
    ("outbox_pkey", "is taken by pgembed's index pgembed.outbox_pkey"),
    ("pipeline_status", "is taken by pgembed's view pgembed.pipeline_status"),
])
def test_bad_names(docs, name, message):
    refused(docs, message, name=name)


def test_names_of_other_relations_and_types_in_schema_pgembed_are_refused(docs):
    docs.execute("CREATE SEQUENCE pgembed.some_sequence")
    docs.execute("CREATE TYPE pgembed.some_type AS ENUM ('a')")
    refused(docs, "is taken by pgembed's sequence pgembed.some_sequence", name="some_sequence")
    refused(docs, "is taken by pgembed's type pgembed.some_type", name="some_type")


def test_a_name_used_by_a_pipeline_is_refused(docs):
    assert create(docs, name="mine") == "mine"
    refused(docs, 'a pipeline named "mine" exists already', name="mine")
    refused(docs, 'a pipeline named "mine" exists already', name="mine", model="hash:16")


def test_names_sharing_their_first_63_bytes_are_refused_not_merged(docs):
    stem = "n" * 63
    assert create(docs, name=stem) == stem
    diag = refused(docs, "is 65 bytes long; pipeline names are at most 63 bytes", name=stem + "_2")
    assert "63 bytes" in (diag.message_hint or "")
    refused(docs, "is 64 bytes long", name="m" * 63 + "x")
    assert docs.execute("SELECT array_agg(name) FROM pgembed.pipelines").fetchone() == ([stem],)


def test_a_derived_name_with_a_control_character_asks_for_a_name(docs):
    docs.execute('CREATE TABLE "two\nlines" (id int PRIMARY KEY, body text)')
    diag = refused(docs, "contains a control character", source='"two\nlines"')
    assert "name =>" in (diag.message_hint or "")
    assert create(docs, source='"two\nlines"', name="two_lines") == "two_lines"


@pytest.mark.parametrize(("arguments", "reloptions"), [
    ({"index_options": '{"m":2,"ef_construction":4}'}, ["m=2", "ef_construction=4"]),
    ({"index_options": '{"m":100,"ef_construction":1000}'}, ["m=100", "ef_construction=1000"]),
    ({"index_options": '{"m":32}'}, ["m=32"]),  # ef_construction 64 (default) = 2 * 32
    ({"index_options": '{"m":8.0}'}, ["m=8"]),
    ({"index_options": None}, None),
    # an IVFFlat index waits for rows to train on: the statement a worker will run says it
    ({"index": "ivfflat", "index_options": '{"lists":1}'}, "WITH (lists = 1)"),
    ({"index": "ivfflat", "index_options": '{"lists":32768}'}, "WITH (lists = 32768)"),
    ({"index": "none", "index_options": "{}"}, "no index"),
    ({"index": "none", "index_options": None}, "no index"),
])
def test_allowed_index_options_at_their_limits(docs, arguments, reloptions):
    name = create(docs, **arguments)
    row = docs.execute(
        "SELECT c.reloptions FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = format('pgembed.%%I', %s::text)::regclass AND NOT i.indisprimary",
        (name,)).fetchone()
    if arguments.get("index") == "ivfflat":
        assert row is None
        deferred = docs.execute("SELECT pgembed.vector_index_sql(p) FROM pgembed.pipelines p "
                                "JOIN pgembed.deferred_indexes d ON d.pipeline = p.name WHERE p.name = %s",
                                (name,)).fetchone()
        assert reloptions in deferred[0]
    else:
        assert (row[0] if row else "no index") == reloptions
    stored = docs.execute("SELECT index_options FROM pgembed.pipelines WHERE name = %s", (name,)).fetchone()[0]
    assert all(isinstance(v, int) for v in stored.values())


@pytest.mark.parametrize("name", [
    "n" * 63, "é" * 31, "with space", "quote'\"s", "semi;colon -- dash", "$body$", "ÜNÏ-code",
])
def test_allowed_names(docs, name):
    assert create(docs, name=name) == name
    assert docs.execute("SELECT to_regclass(format('pgembed.%%I', %s::text)) IS NOT NULL",
                        (name,)).fetchone() == (True,)


@pytest.mark.parametrize(("arguments", "settings"), [
    ({}, ("recursive", 256, 38)),                                   # hash:8: fits the model
    ({"model": "local:all-MiniLM-L6-v2"}, ("recursive", 192, 28)),  # 3/4 of MiniLM's 256
    ({"chunk_tokens": 0}, ("none", 0, 0)),                          # the old "no chunking"
    ({"chunk_tokens": 180, "chunk_overlap": 30}, ("tokens", 180, 30)),  # the old cl100k windows
    ({"chunking": "markdown", "chunk_tokens": 100}, ("markdown", 100, 15)),
    ({"chunking": "truncate"}, ("truncate", 256, 0)),
    ({"chunking": "none"}, ("none", 0, 0)),
])
def test_chunking_defaults_fit_the_model(docs, arguments, settings):
    name = create(docs, **arguments)
    row = docs.execute("SELECT chunking, chunk_tokens, chunk_overlap FROM pgembed.pipelines WHERE name = %s",
                       (name,)).fetchone()
    assert row == settings
