"""An application role with rights on its own table only writes normally through the
SECURITY DEFINER triggers, and can neither read nor change pgembed's tables."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgembed import pipelines


@pytest.fixture
def app_role(conn):
    role = f"app_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    yield role
    conn.execute(f"DROP OWNED BY {role}")
    conn.execute(f"DROP ROLE {role}")


def test_application_role_writes_but_cannot_touch_pgembed(conn, dsn, app_role):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON notes TO {app_role}")
    pipelines.create(conn, "notes", "body", "hash:8")
    with psycopg.connect(make_conninfo(dsn, user=app_role), autocommit=True) as app:
        app.execute("INSERT INTO notes VALUES (1, 'a'), (2, 'b')")
        app.execute("UPDATE notes SET body = 'c' WHERE id = 1")
        app.execute("UPDATE notes SET id = 3 WHERE id = 2")
        app.execute("DELETE FROM notes WHERE id = 1")
        for forbidden in ("SELECT * FROM pgembed.embedding_cache", "SELECT * FROM pgembed.outbox",
                          "DELETE FROM pgembed.outbox", "SELECT * FROM pgembed.notes_h8",
                          "SELECT pgembed.create_pipeline('notes', 'body', 'hash:4')",
                          "SELECT pgembed.p1_capture()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute(forbidden)
        app.execute("TRUNCATE notes")
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone()[0] == 0


def test_trigger_resists_a_hijacked_search_path(conn, dsn, app_role):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute(f"GRANT INSERT ON notes TO {app_role}")
    conn.execute(f"CREATE SCHEMA evil AUTHORIZATION {app_role}")
    pipelines.create(conn, "notes", "body", "hash:8")
    with psycopg.connect(make_conninfo(dsn, user=app_role), autocommit=True) as app:
        # a lookalike of a function the trigger calls, first on the app's path
        app.execute("CREATE FUNCTION evil.jsonb_build_array(VARIADIC text[]) RETURNS jsonb "
                    "LANGUAGE sql AS $$ SELECT '[\"hijacked\"]'::jsonb $$")
        app.execute("CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE sql AS $$ SELECT $$")
        app.execute("SET search_path = evil, pg_catalog, public")
        app.execute("INSERT INTO public.notes VALUES (1, 'x')")
    assert conn.execute("SELECT key FROM pgembed.outbox").fetchall() == [(["1"],)]
