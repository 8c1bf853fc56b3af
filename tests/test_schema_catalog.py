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


def test_downgrade_to_0002_gives_0002_as_shipped_and_upgrade_gives_head_again(empty_dsn, another_empty_dsn):
    """0002 as it shipped: its tables, and the definitions of sql/ then (frozen for 0003's
    downgrade). Dead workers and classified failures do not stop the way back."""
    migrate.upgrade(another_empty_dsn, "0002")
    with psycopg.connect(another_empty_dsn, autocommit=True) as conn:
        conn.execute(revision_sql("0003_failure_classes_and_dead_workers.down.definitions.sql"))
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgembed.heartbeat('gone', 'h', 1, 'v', 'dead', 1, 0, 0, 0, 0)")
    migrate.downgrade(empty_dsn, "0002")
    assert_same(empty_dsn, another_empty_dsn)
    migrate.upgrade(empty_dsn)
    migrate.upgrade(another_empty_dsn)
    assert_same(empty_dsn, another_empty_dsn)


def test_downgrade_to_0003_gives_0003_as_shipped_and_upgrade_gives_head_again(empty_dsn, another_empty_dsn):
    """0003 as it shipped: its tables, and the definitions of sql/ then (frozen for 0004's
    downgrade). Pipelines with chunking options and truncated rows do not stop the way back."""
    migrate.upgrade(another_empty_dsn, "0003")
    with psycopg.connect(another_empty_dsn, autocommit=True) as conn:
        conn.execute(revision_sql("0004_chunking_that_fits_the_model.down.definitions.sql"))
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, title text, body text)")
        conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', chunking => 'markdown', "
                     "chunk_prefix => 'title')")
    migrate.downgrade(empty_dsn, "0003")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgembed.drop_pipeline(name) FROM pgembed.pipelines")
        conn.execute("DROP TABLE notes")
    assert_same(empty_dsn, another_empty_dsn)
    migrate.upgrade(empty_dsn)
    migrate.upgrade(another_empty_dsn)
    assert_same(empty_dsn, another_empty_dsn)


def test_downgrade_to_0004_gives_0004_as_shipped_and_upgrade_gives_head_again(empty_dsn, another_empty_dsn):
    """0004 as it shipped: its tables, and the definitions of sql/ then (frozen for 0005's
    downgrade). A halfvec, binary-quantized pipeline does not stop the way back."""
    migrate.upgrade(another_empty_dsn, "0004")
    with psycopg.connect(another_empty_dsn, autocommit=True) as conn:
        conn.execute(revision_sql("0005_halfvec_and_quantization.down.definitions.sql"))
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', storage => 'halfvec', "
                     "quantization => 'binary')")
    migrate.downgrade(empty_dsn, "0004")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgembed.drop_pipeline(name) FROM pgembed.pipelines")
        conn.execute("DROP TABLE notes")
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
