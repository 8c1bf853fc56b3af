"""A row's content and key have one text, whichever session computes it: the application's
(its DateStyle, TimeZone...), the worker's, the audit's. Content that cannot (the clock, the
session, a STABLE function of yours) is refused at creation; ordinary expressions are not."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.conftest import drain
from tests.reliability.convergence import Expect, converge

PINNED = {"TimeZone=UTC", "DateStyle=ISO, YMD", "IntervalStyle=postgres", "extra_float_digits=1",
          "bytea_output=hex", "lc_monetary=C", "lc_numeric=C", "lc_time=C"}


@pytest.fixture
def docs(conn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text, year int, at timestamptz)")
    conn.execute("INSERT INTO docs VALUES (1, 'T', NULL, 2024, '2024-02-13 12:00+00')")
    conn.execute("CREATE FUNCTION lookup(t text) RETURNS text LANGUAGE sql STABLE AS 'SELECT t'")
    return conn


@pytest.mark.parametrize("content", [
    "title || now()::text", "title || current_setting('TimeZone')", "title || current_user",
    "title || current_timestamp::text", "lookup(title)", "title || to_regclass('docs')::text",
])
def test_session_dependent_content_is_refused(docs, content):
    with pytest.raises(psycopg.Error, match="must give the same text for a row in every session"):
        docs.execute("SELECT pgembed.create_pipeline('docs', %s, 'hash:8')", (content,))
    assert docs.execute("SELECT count(*) FROM pgembed.pipelines").fetchone() == (0,)


@pytest.mark.parametrize("content", [
    "title || ' ' || year", "concat_ws(' ', title, year, at)", "to_char(at, 'YYYY Month')",
    "CASE WHEN body IS NULL THEN title ELSE body END", "title -- the title, and a trailing comment",
    "format('%s (%s)', title, year)", "docs::text",
])
def test_ordinary_expressions_are_accepted_and_embedded(docs, dsn, content):
    name = docs.execute("SELECT pgembed.create_pipeline('docs', %s, 'hash:8')", (content,)).fetchone()[0]
    drain(dsn)
    assert docs.execute("SELECT count(*) FROM pgembed.failures").fetchone() == (0,)
    assert docs.execute("SELECT embedded_rows FROM pgembed.pipeline_status WHERE pipeline = %s",
                        (name,)).fetchone() == (1,)


def test_keys_and_content_render_alike_in_every_session(conn, dsn):
    conn.execute("CREATE TABLE events (day date PRIMARY KEY, at timestamptz, took interval, score float8)")
    conn.execute("SELECT pgembed.create_pipeline('events', "
                 "$$at::text || ' ' || took::text || ' ' || score::text$$, 'hash:8', name => 'events')")
    with psycopg.connect(make_conninfo(dsn, options="-c DateStyle=SQL,DMY -c TimeZone=Asia/Tokyo "
                                                    "-c IntervalStyle=sql_standard -c extra_float_digits=0"),
                         autocommit=True) as app:
        app.execute("INSERT INTO events VALUES ('2024-02-13', '2024-02-13 12:00+00', '1 day 2 hours', 0.1)")
    drain(make_conninfo(dsn, options="-c TimeZone=Asia/Tokyo -c DateStyle=German"))
    converge(conn, [Expect("events", "events", ["day"], ["at", "took", "score"],
                           lambda at, took, score: "2024-02-13 12:00:00+00 1 day 02:00:00 0.1")], timeout=5)
    assert conn.execute("SELECT count(*) FROM pgembed.gaps('events')").fetchone() == (0,)


def test_every_function_that_renders_keys_or_content_pins_the_settings(conn):
    conn.execute("CREATE TABLE by_day (day date PRIMARY KEY, body text)")
    conn.execute("CREATE TABLE by_id (id int PRIMARY KEY, body text)")
    conn.execute("SELECT pgembed.create_pipeline('by_day', 'body', 'hash:8')")
    conn.execute("SELECT pgembed.create_pipeline('by_id', 'body', 'hash:8')")
    config = dict(conn.execute(
        "SELECT p.proname, coalesce(p.proconfig, '{}') FROM pg_proc p "
        "WHERE p.pronamespace = 'pgembed'::regnamespace").fetchall())
    for fn in ("queue_all", "gaps", "explain_gaps", "delete_orphans", "p1_read", "p1_store", "p2_read",
               "p2_store", "p1_capture"):
        assert set(config[fn]) >= PINNED, (fn, config[fn])
    assert not PINNED & set(config["p2_capture"]), "an integer key needs no pinning in the trigger"
