"""`pgembed init` is repeatable; `alembic downgrade base` removes everything it made but the
cluster-wide roles; a worker starts only on the schema revision its package knows."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest
from typer.testing import CliRunner

from pgembed import migrate, pipelines
from pgembed.cli import app
from pgembed.cli.common import EXIT_SCHEMA_MISMATCH

runner = CliRunner()


def objects(conn: psycopg.Connection) -> tuple:
    return conn.execute(
        "SELECT to_regnamespace('pgembed') IS NOT NULL, "
        "(SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal), "
        "(SELECT count(*) FROM notes)").fetchone()


def test_init_twice_then_downgrade_and_upgrade_again(empty_dsn):
    migrate.upgrade(empty_dsn)
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert migrate.current_revision(conn) == migrate.head_revision()
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO notes VALUES (1, 'kept')")
        pipelines.create(conn, "notes", "body", "hash:8")
        assert objects(conn) == (True, 4, 1)
        migrate.downgrade(empty_dsn)
        assert objects(conn) == (False, 0, 1), "schema and triggers gone, application data kept"
        assert migrate.current_revision(conn) is None
        conn.execute("INSERT INTO notes VALUES (2, 'no trigger fires now')")
        migrate.upgrade(empty_dsn)
        assert migrate.current_revision(conn) == migrate.head_revision()
        assert pipelines.list_all(conn) == []


def test_roles_serve_every_database_and_outlive_a_downgrade(empty_dsn, dsn):
    """pgembed_reader and pgembed_worker belong to the cluster: a second init reuses them,
    and downgrading one database leaves them, and the other database's grants, alone."""
    migrate.upgrade(empty_dsn)  # `dsn` was cloned from a template that made the roles already
    migrate.downgrade(empty_dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname IN ('pgembed_reader', "
                            "'pgembed_worker') AND NOT rolcanlogin").fetchone() == (2,)
        assert conn.execute("SELECT has_function_privilege('pgembed_reader', 'pgembed.gaps(text)', "
                            "'EXECUTE'), has_table_privilege('pgembed_reader', 'pgembed.pipeline_status', "
                            "'SELECT'), has_table_privilege('pgembed_worker', 'pgembed.outbox', 'UPDATE'), "
                            "has_table_privilege('pgembed_reader', 'pgembed.outbox', 'SELECT')"
                            ).fetchone() == (True, True, True, False)
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT has_function_privilege('pgembed_reader', 'pgembed.gaps(text)', "
                            "'EXECUTE'), has_function_privilege('public', 'pgembed.gaps(text)', 'EXECUTE')"
                            ).fetchone() == (True, False)


def test_a_worker_starts_only_on_the_schema_revision_it_knows(empty_dsn, monkeypatch):
    def worker() -> str:
        result = runner.invoke(app, ["worker", "--until-empty", "--no-scheduler", "--dsn", empty_dsn])
        assert result.exit_code == EXIT_SCHEMA_MISMATCH == 3 and "Traceback" not in result.output, result.output
        return " ".join(result.output.split())

    assert "this database has no pgembed schema: run `pgembed init` first" in worker()
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        found = migrate.current_revision(conn)
    monkeypatch.setattr(migrate, "HEAD", "0099")  # as a later pgembed would
    assert (f"the pgembed schema is at revision {found}, older than this pgembed (0099): "
            "run `pgembed init`") in worker()


def test_init_sql_prints_the_upgrade_and_changes_nothing(empty_dsn):
    migrate.upgrade(empty_dsn, "0001")
    result = runner.invoke(app, ["init", "--sql", "--dsn", empty_dsn])
    assert result.exit_code == 0, result.output
    assert "upgrade from revision 0001 to" in result.output
    assert "CREATE OR REPLACE FUNCTION pgembed.enqueue" in result.output
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert migrate.current_revision(conn) == "0001"


def test_head_names_the_last_revision_and_no_command_loads_alembic_to_check_it():
    """HEAD spares every worker start alembic's import and its reading of the revision
    modules; it must still be alembic's head."""
    assert migrate.head_revision() == migrate.HEAD
    probe = ("import sys, pgembed.cli, pgembed.worker; "
             "print(sorted(m for m in ('alembic', 'sqlalchemy') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_downgrade_to_a_revision_that_is_not_below_says_so_and_changes_nothing(empty_dsn):
    migrate.upgrade(empty_dsn, "0005")
    with pytest.raises(migrate.DatabaseError, match="cannot downgrade to 0006: it is not below"):
        migrate.downgrade(empty_dsn, "0006")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert migrate.current_revision(conn) == "0005"
