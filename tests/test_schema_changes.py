"""ALTER TABLE is routine in production: a pipeline follows what the application does to its
source table, and the application never sees an error from pgembed's code."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import drain
from tests.reliability.convergence import Expect, converge


@pytest.fixture
def docs(conn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text)")
    conn.execute("INSERT INTO docs SELECT g, 'title ' || g, 'body ' || g FROM generate_series(1, 5) g")
    conn.execute("SELECT pgembed.create_pipeline('docs', $$title || ': ' || body$$, 'hash:8', name => 'docs')")
    return conn


def converged(conn, table="docs", columns=("title", "body"), key="id", content=lambda t, b: f"{t}: {b}"):
    converge(conn, [Expect("docs", table, [key], list(columns), content)], timeout=5)
    assert conn.execute("SELECT count(*) FROM pgembed.gaps('docs')").fetchone() == (0,)


def test_a_renamed_content_column_is_followed(docs, dsn):
    drain(dsn)
    docs.execute("ALTER TABLE docs RENAME COLUMN body TO text_body")
    docs.execute("UPDATE docs SET text_body = 'new body' WHERE id = 1")
    docs.execute("UPDATE docs SET title = 'new title' WHERE id = 2")
    assert docs.execute("SELECT content_columns FROM pgembed.pipelines").fetchone() == (["title", "text_body"],)
    drain(dsn)
    converged(docs, columns=("title", "text_body"))


def test_a_content_column_cannot_be_dropped_but_cascade_takes_the_pipeline(docs, dsn):
    with pytest.raises(psycopg.errors.DependentObjectsStillExist, match=r"pgembed\.p1_content"):
        docs.execute("ALTER TABLE docs DROP COLUMN body")
    docs.execute("ALTER TABLE docs DROP COLUMN body CASCADE")
    docs.execute("UPDATE docs SET title = 'still works' WHERE id = 1")
    docs.execute("INSERT INTO docs VALUES (9, 'nine')")
    assert docs.execute("SELECT count(*) FROM pgembed.pipelines").fetchone() == (0,)
    assert docs.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal").fetchone() == (0,)


def test_whole_row_content_follows_added_and_dropped_columns(conn, dsn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text)")
    conn.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'b')")
    conn.execute("SELECT pgembed.create_pipeline('docs', 'docs::text', 'hash:8', name => 'docs')")
    drain(conn.info.dsn)
    conn.execute("ALTER TABLE docs ADD COLUMN note text")
    conn.execute("UPDATE docs SET note = 'added' WHERE id = 1")  # a change of the new column is captured
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone() == (1,)
    conn.execute("ALTER TABLE docs DROP COLUMN note")
    conn.execute("UPDATE docs SET title = 'changed' WHERE id = 2")
    conn.execute("SELECT pgembed.audit(true)")  # dropping a column changed every row's text
    drain(conn.info.dsn)
    converge(conn, [Expect("docs", "docs", ["id"], ["id", "title"], lambda i, t: f"({i},{t})")], timeout=5)


def test_a_key_type_change_is_followed(docs, dsn):
    docs.execute("ALTER TABLE docs ALTER COLUMN id TYPE bigint")
    docs.execute("INSERT INTO docs VALUES (3000000000, 'big', 'key')")
    assert docs.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = 'pgembed.docs'::regclass AND attname = 'id'").fetchone() == ("bigint",)
    drain(dsn)
    converged(docs)


def test_a_renamed_or_moved_table_is_followed(docs, dsn):
    docs.execute("ALTER TABLE docs RENAME TO articles")
    docs.execute("UPDATE articles SET body = 'renamed' WHERE id = 1")
    docs.execute("CREATE SCHEMA archive")
    docs.execute("ALTER TABLE articles SET SCHEMA archive")
    docs.execute("INSERT INTO archive.articles VALUES (6, 'six', 'moved')")
    docs.execute("ALTER TABLE archive.articles RENAME COLUMN id TO article_id")
    docs.execute("UPDATE archive.articles SET title = 'after key rename' WHERE article_id = 2")
    drain(dsn)
    assert docs.execute("SELECT count(*) FROM pgembed.failures").fetchone() == (0,)
    converged(docs, table="archive.articles", key="article_id")


def test_a_dropped_source_stops_its_pipeline_visibly(docs, dsn):
    docs.execute("UPDATE docs SET body = 'queued' WHERE id = 1")
    docs.execute("DROP TABLE docs")
    assert docs.execute("SELECT count(*) FROM pgembed.outbox").fetchone() == (0,)
    stats = drain(dsn)
    assert stats.failed == 0
    assert docs.execute("SELECT pipeline, source_rows, embedded_rows FROM pgembed.pipeline_status"
                        ).fetchall() == [("docs", None, 0)]
    docs.execute("SELECT pgembed.drop_pipeline('docs')")


def test_every_write_to_a_partitioned_table_is_captured(conn, dsn):
    conn.execute("CREATE TABLE events (id int PRIMARY KEY, body text) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (0) TO (100)")
    conn.execute("CREATE TABLE events_high PARTITION OF events FOR VALUES FROM (100) TO (200)")
    conn.execute("INSERT INTO events VALUES (1, 'via parent'), (150, 'via parent')")
    conn.execute("SELECT pgembed.create_pipeline('events', 'body', 'hash:8', name => 'docs')")
    conn.execute("INSERT INTO events_low VALUES (2, 'aimed at a partition')")
    conn.execute("UPDATE events_high SET body = 'updated in a partition' WHERE id = 150")
    drain(dsn)
    conn.execute("DELETE FROM events_low WHERE id = 1")
    conn.execute("TRUNCATE events_high")
    conn.execute("CREATE TABLE events_mid (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO events_mid VALUES (250, 'attached')")
    conn.execute("ALTER TABLE events ATTACH PARTITION events_mid FOR VALUES FROM (200) TO (300)")
    conn.execute("CREATE TABLE events_new PARTITION OF events FOR VALUES FROM (300) TO (400)")
    conn.execute("INSERT INTO events_new VALUES (301, 'new partition')")
    conn.execute("ALTER TABLE events DETACH PARTITION events_low")
    conn.execute("INSERT INTO events_low VALUES (3, 'detached: not captured')")
    drain(dsn)
    converge(conn, [Expect("docs", "events", ["id"], ["body"], lambda body: body)], timeout=5)
    assert sorted(r[0] for r in conn.execute("SELECT id FROM pgembed.docs")) == [250, 301]


def test_a_change_under_a_virtual_generated_column_is_captured(conn, dsn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, a text, b text, "
                 "v text GENERATED ALWAYS AS (a || ' ' || b) VIRTUAL)")
    conn.execute("INSERT INTO docs (id, a, b) VALUES (1, 'first', 'row')")
    conn.execute("SELECT pgembed.create_pipeline('docs', 'v', 'hash:8', name => 'docs')")
    drain(dsn)
    conn.execute("UPDATE docs SET b = 'changed' WHERE id = 1")  # v has no value in the trigger's rows
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone() == (1,)
    drain(dsn)
    converge(conn, [Expect("docs", "docs", ["id"], ["a", "b"], lambda a, b: f"{a} {b}")], timeout=5)


def test_a_content_column_changes_type_once_its_binding_view_steps_aside(docs, dsn):
    with docs.transaction():
        docs.execute("DROP VIEW pgembed.p1_content")
        docs.execute("ALTER TABLE docs ALTER COLUMN title TYPE varchar(40)")
    assert docs.execute("SELECT to_regclass('pgembed.p1_content') IS NOT NULL, count(*) "
                        "FROM pgembed.pipelines").fetchone() == (True, 1)
    docs.execute("UPDATE docs SET title = 'typed' WHERE id = 1")
    drain(dsn)
    converged(docs)
