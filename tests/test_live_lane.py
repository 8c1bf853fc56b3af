"""The live lane: rows the application changed are claimed before any bulk row (backfill,
repair, migration) of any pipeline, and the bulk lane keeps to its window. Claims here are
pgembed.claim, the statement every worker runs."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from pgembed.client import Client
from tests.conftest import drain

BATCH = 100


def claim(conn: psycopg.Connection, limit: int = BATCH) -> list[tuple]:
    return conn.execute("SELECT pipeline, key, purpose FROM pgembed.claim('w', %s, %s, 60)",
                        (uuid.uuid4(), limit)).fetchall()


@pytest.fixture
def backlog(conn: psycopg.Connection) -> psycopg.Connection:
    """Two pipelines of one table; the second has a 5,000-row migration backlog queued."""
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs SELECT i, 'document ' || i FROM generate_series(1, 5000) AS i")
    conn.execute("SELECT pgembed.create_pipeline('docs', 'body', 'hash:8', backfill => false, name => 'old')")
    conn.execute("SELECT pgembed.create_pipeline('docs', 'body', 'hash:16', backfill => false, name => 'new')")
    conn.execute("SELECT pgembed.queue_all('new', 'migration')")
    return conn


def test_a_row_inserted_behind_a_backlog_is_claimed_first(backlog: psycopg.Connection) -> None:
    conn = backlog
    conn.execute("INSERT INTO docs VALUES (5001, 'the application''s row')")
    conn.execute("SELECT pgembed.queue_all('new', 'repair')")  # more bulk work, queued after it
    # one pipeline a claim: the live row of each, before any of the 10,000 bulk rows
    assert claim(conn) == [("new", ["5001"], "sync")]
    assert claim(conn) == [("old", ["5001"], "sync")]
    # then the backlog, oldest first: a full claim of migration rows
    bulk = claim(conn)
    assert len(bulk) == BATCH and {purpose for _, _, purpose in bulk} == {"migration"}


def test_bulk_rows_wait_for_the_window_and_live_rows_do_not(backlog: psycopg.Connection) -> None:
    conn = backlog
    conn.execute("UPDATE pgembed.bulk_lane SET opens = (now() AT TIME ZONE 'UTC')::time + interval '1 hour', "
                 "closes = (now() AT TIME ZONE 'UTC')::time + interval '2 hours'")
    assert claim(conn) == []
    # a live change, also of a row queued under 'migration' for new: it moves to the live lane
    conn.execute("UPDATE docs SET body = 'changed' WHERE id = 7")
    conn.execute("INSERT INTO docs VALUES (6000, 'new row')")
    claimed = claim(conn) + claim(conn)
    assert sorted((p, tuple(k), purpose) for p, k, purpose in claimed) == [
        ("new", ("6000",), "sync"), ("new", ("7",), "sync"), ("old", ("6000",), "sync"), ("old", ("7",), "sync")]
    assert claim(conn) == []
    conn.execute("UPDATE pgembed.bulk_lane SET opens = NULL, closes = NULL")
    assert {purpose for _, _, purpose in claim(conn)} == {"migration"}


def test_a_window_across_midnight(conn: psycopg.Connection) -> None:
    conn.execute("UPDATE pgembed.bulk_lane SET opens = '22:00', closes = '06:00', time_zone = 'Europe/Paris'")
    is_open = "SELECT pgembed.bulk_lane_open(%s::timestamptz)"
    assert conn.execute(is_open, ("2026-12-01 23:30+01",)).fetchone()[0] is True
    assert conn.execute(is_open, ("2026-12-01 05:59+01",)).fetchone()[0] is True
    assert conn.execute(is_open, ("2026-12-01 12:00+01",)).fetchone()[0] is False
    assert conn.execute(is_open, ("2026-12-01 21:30Z",)).fetchone()[0] is True  # 22:30 in Paris


@pytest.mark.parametrize(("change", "message"), [
    ("opens = '22:00'", "bulk_lane: opens and closes go together"),
    ("opens = '22:00', closes = '22:00'", "bulk_lane: opens and closes must differ"),
    ("rate_share = 0", "bulk_lane: rate_share must be above 0 and at most 1"),
    ("rate_share = 1.5", "bulk_lane: rate_share must be above 0 and at most 1"),
])
def test_a_bad_window_is_refused_and_the_lane_kept(conn: psycopg.Connection, change: str, message: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=message):
        conn.execute(f"UPDATE pgembed.bulk_lane SET {change}")
    assert conn.execute("SELECT opens, closes, pgembed.bulk_lane_open() FROM pgembed.bulk_lane").fetchone() == \
        (None, None, True)


def test_a_worker_embeds_the_live_row_within_two_batches_of_the_backlog(backlog: psycopg.Connection,
                                                                        dsn: str) -> None:
    """Each acknowledgement is a transaction of its own, so embedded_at orders the batches:
    when the live row was stored, at most two batches of the backlog had been."""
    conn = backlog
    conn.execute("INSERT INTO docs VALUES (5001, 'the application''s row')")
    stats = drain(dsn, batch_size=BATCH, bulk_batch_size=BATCH)
    assert stats.failed == 0
    counts = conn.execute("SELECT (SELECT count(DISTINCT id) FROM pgembed.old), "
                          "(SELECT count(DISTINCT id) FROM pgembed.new), (SELECT count(*) FROM pgembed.outbox)")
    assert counts.fetchone() == (1, 5001, 0)
    conn.execute("SELECT pgembed.set_alias('docs', 'old')")
    with Client(dsn) as client:  # searchable through the alias the application uses
        assert {"id": 5001} in [h.key for h in client.search("docs", "the application's row", k=5)]
    for pipeline in ("old", "new"):  # the shadow's copy too, though its own backlog was queued first
        before = conn.execute(f"SELECT count(*) FROM pgembed.new WHERE embedded_at < "
                              f"(SELECT embedded_at FROM pgembed.{pipeline} WHERE id = 5001)").fetchone()[0]
        assert before <= 2 * BATCH, pipeline


def test_bulk_requests_keep_to_their_share_of_the_rate_budget(conn: psycopg.Connection, dsn: str, fake_api) -> None:
    """A bulk batch's requests are granted from the share's bucket and then the key's; a
    live batch's from the key's alone (pgembed.take_bulk_budget)."""
    from pgembed.ratelimit import Budget, set_openai_budget

    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes SELECT i, 'note ' || i FROM generate_series(1, 50) AS i")
    bucket = set_openai_budget(conn, Budget.per_minute(rpm=6000, tpm=1_000_000))
    conn.execute("UPDATE pgembed.bulk_lane SET rate_share = 0.25")
    conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'openai:text-embedding-3-small')")
    drain(dsn, batch_size=10, bulk_batch_size=10)
    share = "bulk " + bucket
    held = conn.execute("SELECT max_requests, max_tokens, per_seconds FROM pgembed.rate_limits WHERE bucket = %s",
                        (share,)).fetchone()
    assert held == (1500, 250_000, 60)

    def granted(name: str) -> int:
        return conn.execute("SELECT granted_requests FROM pgembed.rate_limit_state WHERE bucket = %s",
                            (name,)).fetchone()[0]

    backfill = granted(bucket)
    assert granted(share) == backfill == fake_api.requests == 5  # every request of the backfill, both buckets
    conn.execute("INSERT INTO notes VALUES (51, 'a live note')")
    drain(dsn)
    assert (granted(share), granted(bucket)) == (backfill, backfill + 1)


def test_a_live_change_moves_a_row_queued_for_bulk_work_to_the_live_lane(backlog: psycopg.Connection) -> None:
    """A row the application changes while it waits in a backfill (or a repair, a migration)
    is a live change: it must not wait behind the whole backlog, nor be starved by live rows
    queued after it. A bulk re-queue of a live row leaves it live."""
    conn = backlog
    conn.execute("UPDATE docs SET body = 'changed while queued for the migration' WHERE id = 4999")
    conn.execute("SELECT pgembed.queue_all('old', 'repair')")  # bulk work over old's live rows: stays live
    assert claim(conn) == [("new", ["4999"], "sync")]
    assert claim(conn) == [("old", ["4999"], "sync")]
    assert {purpose for _, _, purpose in claim(conn)} == {"migration"}
