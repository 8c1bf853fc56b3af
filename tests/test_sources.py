"""Tables that cannot be captured are refused at creation with pgembed's sentence."""

from __future__ import annotations

import psycopg
import pytest


@pytest.mark.parametrize(("setup", "source", "says"), [
    ("CREATE TEMP TABLE scratch (id int PRIMARY KEY, body text)", "scratch", "temporary table"),
    ("", "pgembed.outbox", "one of pgembed's own tables"),
    ("", "pgembed.pipelines", "one of pgembed's own tables"),
    ("CREATE TABLE parent (id int PRIMARY KEY, body text); CREATE TABLE child () INHERITS (parent)",
     "parent", "inheritance children"),
    ("CREATE TABLE t (id int PRIMARY KEY, body text); CREATE VIEW v AS SELECT * FROM t", "v", "is not a table"),
])
def test_a_source_that_cannot_be_captured_is_refused(conn, setup, source, says):
    if setup:
        conn.execute(setup)
    with pytest.raises(psycopg.Error, match=says) as refused:
        conn.execute("SELECT pgembed.create_pipeline(%s::regclass, 'body', 'hash:8')", (source,))
    assert (refused.value.diag.message_primary or "").startswith("pgembed:")
    assert conn.execute("SELECT count(*) FROM pgembed.pipelines").fetchone() == (0,)
