"""`pgembed init` is repeatable; `alembic downgrade base` removes everything it made."""

from __future__ import annotations

import psycopg

from pgembed import migrate, pipelines


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
