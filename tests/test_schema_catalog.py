"""The migrations and sql/ describe one schema: a database upgraded to head, by any path, is
identical (tables, columns, constraints, indexes, functions, views, triggers, comments,
grants) to one made straight from sql/."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from pgembed import migrate
from pgembed.schema import head_schema_sql, revision_sql
from tests.catalog import differences, snapshot

RELEASES = Path(__file__).parent / "releases"


def from_sql(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(head_schema_sql())


def assert_same(left: str, right: str) -> None:
    found = differences(snapshot(left), snapshot(right))
    assert not found, "catalogs differ:\n" + "\n".join(line[:300] for line in found[:80])


def test_upgrade_head_equals_the_schema_in_sql(empty_dsn, another_empty_dsn):
    migrate.upgrade(empty_dsn)
    from_sql(another_empty_dsn)
    assert_same(empty_dsn, another_empty_dsn)


def test_the_comparison_sees_a_change(empty_dsn, another_empty_dsn):
    """The diff is not blind: one column default apart is a difference."""
    migrate.upgrade(empty_dsn)
    from_sql(another_empty_dsn)
    with psycopg.connect(another_empty_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgembed.outbox ALTER COLUMN attempts SET DEFAULT 1")
    assert differences(snapshot(empty_dsn), snapshot(another_empty_dsn))


def test_downgrade_to_0001_gives_0001_as_shipped_and_upgrade_gives_head_again(empty_dsn, another_empty_dsn):
    migrate.upgrade(another_empty_dsn, "0001")
    migrate.upgrade(empty_dsn)
    migrate.downgrade(empty_dsn, "0001")
    assert_same(empty_dsn, another_empty_dsn)
    migrate.upgrade(empty_dsn)
    migrate.upgrade(another_empty_dsn)
    assert_same(empty_dsn, another_empty_dsn)


# Each revision's downgrade re-applies the definitions of the revision before it, frozen; the
# data set up at head is what that revision must be able to take back.
DOWNGRADES = {
    # dead workers and classified failures
    "0002": ("0003_failure_classes_and_dead_workers.down.definitions.sql",
             ["SELECT pgembed.heartbeat('gone', 'h', 1, 'v', 'dead', 1, 0, 0, 0, 0)"]),
    # a pipeline with chunking options (and its truncated column)
    "0003": ("0004_chunking_that_fits_the_model.down.definitions.sql",
             ["CREATE TABLE notes (id int PRIMARY KEY, title text, body text)",
              "SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', chunking => 'markdown', "
              "chunk_prefix => 'title')"]),
    # a halfvec, binary-quantized pipeline
    "0004": ("0005_halfvec_and_quantization.down.definitions.sql",
             ["CREATE TABLE notes (id int PRIMARY KEY, title text, body text)",
              "SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', storage => 'halfvec', "
              "quantization => 'binary')"]),
    # this session's: see the sections of revision 0006 (each adds what its downgrade must undo)
    "0005": ("0006_late_chunking_search_names_and_model_migration.down.definitions.sql",
             ["CREATE TABLE notes (id int PRIMARY KEY, title text, body text)",
              "SELECT pgembed.create_pipeline('notes', 'body', 'hash:8')",
              # stable search names and evaluation: an alias (and its view), a set, a run
              "INSERT INTO notes VALUES (1, 't', 'b')",
              "SELECT pgembed.set_alias('notes_search', 'notes_h8')",
              "SELECT pgembed.import_eval_set('s', 'notes', 'jsonl', '[{\"id\": \"q\", \"query\": \"b\"}]', "
              "'[{\"query_id\": \"q\", \"key\": 1, \"relevance\": 1}]')",
              "INSERT INTO pgembed.eval_runs (target, pipeline, model, eval_set, metrics, ks, queries) "
              "VALUES ('notes_search', 'notes_h8', 'hash:8', 's', '{}', '{5}', 1)",
              # late chunking
              "SELECT pgembed.create_pipeline('notes', 'body', 'local:all-MiniLM-L6-v2', late_chunking => true)",
              # indexes that wait for their data: an IVFFlat index deferred
              "SELECT pgembed.create_pipeline('notes', 'title', 'hash:8', index => 'ivfflat')",
              # model migrations: a migration and its first event
              "INSERT INTO pgembed.model_migrations (alias, from_pipeline, to_pipeline, from_model, to_model, "
              "to_dimensions) VALUES ('notes', 'notes_h8', 'notes_h16', 'hash:8', 'hash:16', 16)",
              "SELECT pgembed.migration_event(1, 'started')"]),
    # this session's: see the sections of revision 0007 (each adds what its downgrade must undo)
    "0006": ("0007_gateway_costs_write_through_and_batch_api.down.definitions.sql",
             ["CREATE TABLE notes (id int PRIMARY KEY, title text, body text)",
              "SELECT pgembed.create_pipeline('notes', 'body', 'hash:8')",
              # cost by source, user and task: an attributed query and a gateway document
              "INSERT INTO pgembed.usage (model, purpose, source, app_user, task, tokens) "
              "VALUES ('hash:8', 'query', 'user_query', 'u1', 'ask', 5), "
              "('hash:8', 'index', 'note_index', 'u2', 'save', 7)",
              # cost by source, user and task: a budget with a headroom, and what it learnt
              "SELECT pgembed.set_rate_limit('b', 10, NULL, 60, 1, NULL, NULL, 0.8)",
              "SELECT pgembed.take_budget('b', 1, 0)",
              "SELECT pgembed.learn_rate_limit('b', 10, 5, 30, 1000, 900, 30)",
              # the provider's Batch API: a batch holding a backfill row, given back by the downgrade
              "INSERT INTO notes VALUES (1, 'a title', 'a body')",
              "UPDATE pgembed.outbox SET purpose = 'backfill'",
              "SELECT pgembed.batch_api_claim(name, 10, 3600) FROM pgembed.pipelines"]),
}


@pytest.mark.parametrize("revision", sorted(DOWNGRADES))
def test_downgrade_gives_the_revision_as_shipped_and_upgrade_gives_head_again(revision, empty_dsn,
                                                                              another_empty_dsn):
    """A revision as it shipped: its tables, and the definitions of sql/ then (frozen for the
    next revision's downgrade). What the later revisions hold does not stop the way back."""
    frozen, setup = DOWNGRADES[revision]
    migrate.upgrade(another_empty_dsn, revision)
    with psycopg.connect(another_empty_dsn, autocommit=True) as conn:
        conn.execute(revision_sql(frozen))
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        for statement in setup:
            conn.execute(statement)
    migrate.downgrade(empty_dsn, revision)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:  # the pipeline is data, not schema
        conn.execute("SELECT pgembed.drop_pipeline(name) FROM pgembed.pipelines")
        conn.execute("DROP TABLE IF EXISTS notes")
    assert_same(empty_dsn, another_empty_dsn)
    migrate.upgrade(empty_dsn)
    migrate.upgrade(another_empty_dsn)
    assert_same(empty_dsn, another_empty_dsn)


@pytest.mark.parametrize("release", ["0001_2026-11-30"])
def test_a_database_of_the_previous_release_upgrades_to_head(release, empty_dsn, another_empty_dsn):
    """The last build that shipped revision 0001 had changed sql/ under the same number."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        for name in ("schema", "functions", "audit", "costs", "service", "ratelimit", "privileges"):
            conn.execute((RELEASES / release / f"{name}.sql").read_text())
        conn.execute("CREATE TABLE public.pgembed_alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO public.pgembed_alembic_version VALUES ('0001')")
    migrate.upgrade(empty_dsn)
    migrate.upgrade(another_empty_dsn)
    assert_same(empty_dsn, another_empty_dsn)


@pytest.mark.parametrize("start", [None, "0001"])
def test_the_printed_upgrade_script_gives_the_same_database(start, empty_dsn, another_empty_dsn):
    """`pgembed init --sql` prints what a DBA applies by hand; applied, it is `pgembed init`."""
    if start:
        migrate.upgrade(empty_dsn, start)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(migrate.upgrade_sql(migrate.current_revision(conn)))
        assert migrate.current_revision(conn) == migrate.head_revision()
    migrate.upgrade(another_empty_dsn)
    assert_same(empty_dsn, another_empty_dsn)
