"""One rule queues a key, whatever queues it (pgembed.enqueue, documented in sql/outbox.sql):
each entry point × each state the key can already be in gives the documented outcome, and
no entry point ever breaks a lease a worker holds."""

from __future__ import annotations

import psycopg
import pytest

LEASE = "00000000-0000-0000-0000-00000000beef"

STATES = {
    # state: how to put key ["1"] in it
    "queued": "UPDATE pgembed.outbox SET available_at = now() - interval '1 minute', attempts = 0",
    "retrying": "UPDATE pgembed.outbox SET available_at = now() + interval '1 hour', attempts = 2",
    "in_flight": (f"UPDATE pgembed.outbox SET lease_id = '{LEASE}', leased_by = 'worker-a', "
                  "available_at = now() + interval '1 hour'"),
}

PARKED = ("INSERT INTO pgembed.failures (pipeline, key, error, attempts, first_failed_at, parked_at) "
          "VALUES ('t', '[\"1\"]', 'no', 5, now() - interval '2 hours', now() - interval '1 hour')")

ENTRY_POINTS = {
    "capture trigger": ["UPDATE t SET body = 'changed' WHERE id = 1"],
    "queue_all": ["SELECT pgembed.queue_all('t', 'repair')"],
    "expand_statements": ["INSERT INTO pgembed.outbox_statements (pipeline, keys, key_count) VALUES ('t', '{1}', 1)",
                          "SELECT pgembed.expand_statements('t')"],
    "retry_failures": [PARKED, "SELECT pgembed.retry_failures()"],
    "retry_failures by class": [PARKED, "SELECT pgembed.retry_failures('t', class => 'unknown')"],
    "retry_parked_failures": [PARKED, "SELECT pgembed.retry_parked_failures('1 minute', '1 minute')"],
    "enqueue": ["SELECT pgembed.enqueue('t', ARRAY['[\"1\"]'::jsonb], 'repair')"],
}

# the purpose a live entry point gives a key queued for bulk work (here the backfill's): a
# change the application made, or a retry, is live; the others keep the key's purpose
LIVE = {"capture trigger": "sync", "expand_statements": "sync", "retry_failures": "retry",
        "retry_failures by class": "retry", "retry_parked_failures": "retry"}

ROW = ("SELECT version, attempts, purpose, lease_id::text, leased_by, available_at, available_at <= now() "
       "FROM pgembed.outbox")


@pytest.fixture
def queued_key(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t VALUES (1, 'first')")
    conn.execute("SELECT pgembed.create_pipeline('t', 'body', 'hash:8', name => 't')")
    return conn


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("state", list(STATES))
def test_every_entry_point_follows_the_rule(queued_key, entry, state):
    conn = queued_key
    conn.execute(STATES[state])
    version, _, purpose, _, _, available_at, _ = conn.execute(ROW).fetchone()
    for statement in ENTRY_POINTS[entry]:
        conn.execute(statement)
    after = conn.execute(ROW).fetchall()
    assert len(after) == 1, "one row per key"
    new_version, attempts, new_purpose, lease, holder, new_available_at, ready = after[0]
    assert purpose == "backfill"
    assert (new_version, attempts, new_purpose) == (version + 1, 0, LIVE.get(entry, purpose)), \
        "bumped; a live change moves it to the live lane, bulk work keeps its purpose"
    if state == "in_flight":
        assert (lease, holder, new_available_at) == (LEASE, "worker-a", available_at), "the lease was broken"
    else:
        assert lease is None and ready, "ready now"
    if state == "queued":
        assert new_available_at == available_at, "a queued key keeps its place in line"


def test_a_new_key_is_queued_ready_with_its_purpose(queued_key):
    conn = queued_key
    conn.execute("SELECT pgembed.enqueue('t', ARRAY['[\"2\"]'::jsonb], 'repair')")
    assert conn.execute("SELECT version, purpose, available_at <= now(), lease_id FROM pgembed.outbox "
                        "WHERE key = '[\"2\"]'").fetchone() == (1, "repair", True, None)


def test_a_lease_needs_its_holder(queued_key):
    with pytest.raises(psycopg.errors.CheckViolation, match="outbox_lease_holder"):
        queued_key.execute(f"UPDATE pgembed.outbox SET lease_id = '{LEASE}'")
