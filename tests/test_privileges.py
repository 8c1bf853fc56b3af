"""An application role with rights on its own table only writes normally through the
SECURITY DEFINER triggers, and can neither read nor change pgembed's tables. The group roles
`pgembed init` makes: a login in pgembed_worker drains a queue with no other grant than
SELECT on the source table; a login in pgembed_reader reads the views, whose gap functions
run as the owner without ever running anyone else's code."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgembed import migrate, pipelines
from tests.conftest import drain


@pytest.fixture
def app_role(conn):
    role = f"app_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    yield role
    conn.execute(f"DROP OWNED BY {role} CASCADE")
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


@pytest.fixture
def login(conn):
    """Makes login roles for a test and drops them after it."""
    made: list[str] = []

    def make(*options: str) -> str:
        role = f"r_{uuid.uuid4().hex[:8]}"
        conn.execute(f"CREATE ROLE {role} LOGIN {' '.join(options)}")
        made.append(role)
        return role

    yield make
    for role in made:
        conn.execute(f"DROP OWNED BY {role} CASCADE")
        conn.execute(f"DROP ROLE {role}")


def test_a_login_in_pgembed_worker_drains_the_queue_and_reads_nothing_else(conn, dsn, login):
    """pgembed init's pgembed_worker plus SELECT on the source table is all a worker needs."""
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 30) g")
    name = pipelines.create(conn, "notes", "body", "hash:8")
    conn.execute("GRANT SELECT ON notes TO pgembed_worker")
    conn.execute("INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(31, 1530) g")  # a batch
    worker = login("IN ROLE pgembed_worker")
    stats = drain(make_conninfo(dsn, user=worker), batch_size=100, max_attempts=1)
    assert (stats.written, stats.failed) == (1530, 0)
    assert conn.execute(f"SELECT count(*) FROM pgembed.{name}").fetchone() == (1530,)
    assert conn.execute("SELECT count(*) FROM pgembed.outbox").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pgembed.outbox_statements").fetchone() == (0,)
    with psycopg.connect(make_conninfo(dsn, user=worker), autocommit=True) as w:
        for forbidden in ("SELECT * FROM pgembed.audit_runs", "SELECT * FROM pgembed.consistency_gaps",
                          "SELECT * FROM pgembed.gaps()", "SELECT pgembed.queue_all('notes_h8')",
                          "DELETE FROM pgembed.usage", "DELETE FROM pgembed.embedding_cache",
                          "INSERT INTO pgembed.rate_limits (bucket, max_requests) VALUES ('x', 1)",
                          "SELECT pgembed.create_pipeline('notes', 'body', 'hash:4')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                w.execute(forbidden)


def test_the_gap_functions_run_as_the_owner_for_pgembed_reader_only(conn, dsn, login, app_role):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes VALUES (1, 'a')")
    pipelines.create(conn, "notes", "body", "hash:8")
    reader = login("IN ROLE pgembed_reader")
    usage_only = login()  # USAGE on the schema by mistake: still no SECURITY DEFINER function
    conn.execute(f"GRANT USAGE ON SCHEMA pgembed TO {usage_only}")
    with psycopg.connect(make_conninfo(dsn, user=reader), autocommit=True) as r:
        assert r.execute("SELECT source_rows, embedded_rows, queued FROM pgembed.pipeline_status"
                         ).fetchall() == [(1, 0, 1)]
        assert r.execute("SELECT count(*) FROM pgembed.consistency_gaps").fetchone() == (0,)
        for forbidden in ("SELECT * FROM notes", "SELECT * FROM pgembed.outbox",
                          "SELECT * FROM pgembed.pipelines", "SELECT * FROM pgembed.notes_h8"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                r.execute(forbidden)
    for role in (usage_only, app_role):
        with psycopg.connect(make_conninfo(dsn, user=role), autocommit=True) as other:
            for forbidden in ("SELECT * FROM pgembed.gaps()", "SELECT * FROM pgembed.pipeline_counts('notes_h8')",
                              "SELECT * FROM pgembed.consistency_gaps", "SELECT * FROM pgembed.pipeline_status",
                              "SELECT * FROM pgembed.cost_daily"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    other.execute(forbidden)


def test_the_audit_never_runs_anothers_code_with_the_owners_rights(conn, dsn, login):
    """The stale check evaluates the content expression as pgembed's owner: what it calls was
    bound when the pipeline was created, and must still belong to the owner or a superuser."""
    intruder = login()
    conn.execute(f"CREATE SCHEMA app AUTHORIZATION {intruder}")  # first on the creator's path
    conn.execute("CREATE TABLE public.notes (id int PRIMARY KEY, body varchar(100))")
    conn.execute("INSERT INTO public.notes SELECT g, 'Note ' || g FROM generate_series(1, 5) g")
    conn.execute("CREATE FUNCTION public.tidy(t text) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT lower(t)'")
    conn.execute("CREATE TABLE public.ran (who text)")
    conn.execute("SET search_path = app, public")
    name = pipelines.create(conn, "notes", "tidy(body) || body", "hash:8")
    conn.execute("RESET search_path")
    drain(dsn)
    with psycopg.connect(make_conninfo(dsn, user=intruder), autocommit=True) as i:
        # better matches than public.tidy(text) and pg_catalog's text || text for a varchar
        i.execute("CREATE FUNCTION app.tidy(t varchar) RETURNS text LANGUAGE plpgsql AS "
                  "$$ BEGIN INSERT INTO public.ran VALUES (current_user); RETURN t; END $$")
        i.execute("CREATE FUNCTION app.cat(a text, b varchar) RETURNS text LANGUAGE plpgsql AS "
                  "$$ BEGIN INSERT INTO public.ran VALUES (current_user); RETURN a; END $$")
        i.execute("CREATE OPERATOR app.|| (FUNCTION = app.cat, LEFTARG = text, RIGHTARG = varchar)")
    conn.execute("SET search_path = app, public")
    conn.execute("SELECT tidy(body) || body FROM notes").fetchall()  # the expression as written...
    conn.execute("RESET search_path")
    assert conn.execute("DELETE FROM public.ran").rowcount == 10, "...would now run the intruder's code"

    reader = login("IN ROLE pgembed_reader")
    warnings: list[str] = []

    def read_as_reader(statement: str) -> tuple:
        with psycopg.connect(make_conninfo(dsn, user=reader), autocommit=True) as r:
            r.add_notice_handler(lambda diag: warnings.append(diag.message_primary or ""))
            return r.execute(statement).fetchone()

    assert read_as_reader("SELECT source_rows, stale FROM pgembed.pipeline_status") == (5, None)
    assert read_as_reader("SELECT count(*) FROM pgembed.consistency_gaps") == (0,)
    assert warnings == []
    assert conn.execute("SELECT count(*) FROM public.ran").fetchone() == (0,), "planted code ran"
    # nor does the worker call the lookalikes: its reader evaluates the bound expression too
    conn.execute("UPDATE public.notes SET body = body || '!' WHERE id = 1")
    assert drain(dsn).written == 1
    assert conn.execute(f"SELECT chunk FROM pgembed.{name} WHERE id = 1").fetchone() == ("note 1!Note 1!",)
    assert conn.execute("SELECT count(*) FROM public.ran").fetchone() == (0,), "the worker ran planted code"

    # the function the pipeline calls, handed to another role, may now do anything: it is
    # not evaluated, and the DBA is told why
    conn.execute(f"ALTER FUNCTION public.tidy(text) OWNER TO {intruder}")
    conn.execute(f"GRANT CREATE ON SCHEMA public TO {intruder}")
    with psycopg.connect(make_conninfo(dsn, user=intruder), autocommit=True) as i:
        i.execute("CREATE OR REPLACE FUNCTION public.tidy(t text) RETURNS text LANGUAGE plpgsql AS "
                  "$$ BEGIN INSERT INTO public.ran VALUES (current_user); RETURN t; END $$")
    assert read_as_reader(f"SELECT count(*) FROM pgembed.gaps('{name}')") == (0,)
    assert any("stale rows not checked" in w and f"public.tidy(text) (owned by {intruder})" in w
               for w in warnings), warnings
    assert conn.execute("SELECT count(*) FROM public.ran").fetchone() == (0,), "the intruder's code ran"


def test_the_readme_roles_from_a_non_superuser_init_to_a_dba(empty_dsn):
    """README, "Privileges and roles": the owner needs no superuser, the worker nothing but
    pgembed_worker and SELECT on the source, the DBA nothing but pgembed_reader."""
    tag = uuid.uuid4().hex[:6]
    admin, app, embedder, alice = (f"{r}_{tag}" for r in ("admin", "app", "embedder", "alice"))
    database = conninfo_to_dict(empty_dsn)["dbname"]
    with psycopg.connect(empty_dsn, autocommit=True) as su:
        su.execute("CREATE EXTENSION vector")
        su.execute(f"CREATE ROLE {admin} LOGIN")
        su.execute(f"CREATE ROLE {app} LOGIN")
        su.execute(f"CREATE ROLE {embedder} LOGIN IN ROLE pgembed_worker")
        su.execute(f"CREATE ROLE {alice} LOGIN IN ROLE pgembed_reader")
        su.execute(f'GRANT CREATE ON DATABASE "{database}" TO {admin}')
        su.execute(f"GRANT CREATE ON SCHEMA public TO {admin}")
        su.execute(f"CREATE SCHEMA app AUTHORIZATION {app}")
    try:
        migrate.upgrade(make_conninfo(empty_dsn, user=admin))
        with psycopg.connect(make_conninfo(empty_dsn, user=app), autocommit=True) as a:
            a.execute("CREATE TABLE app.articles (id int PRIMARY KEY, body text)")
            a.execute("INSERT INTO app.articles SELECT g, 'article ' || g FROM generate_series(1, 20) g")
            a.execute(f"GRANT USAGE ON SCHEMA app TO {admin}, pgembed_worker")
            a.execute(f"GRANT SELECT, TRIGGER, MAINTAIN ON app.articles TO {admin}")
            a.execute("GRANT SELECT ON app.articles TO pgembed_worker")
        with psycopg.connect(make_conninfo(empty_dsn, user=admin), autocommit=True) as owner:
            name = pipelines.create(owner, "app.articles", "body", "hash:8")
        with psycopg.connect(make_conninfo(empty_dsn, user=app), autocommit=True) as a:
            a.execute("UPDATE app.articles SET body = 'changed' WHERE id <= 5")
            a.execute("DELETE FROM app.articles WHERE id = 20")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                a.execute("SELECT * FROM pgembed.pipeline_status")
        assert drain(make_conninfo(empty_dsn, user=embedder)).written >= 19
        with psycopg.connect(make_conninfo(empty_dsn, user=alice), autocommit=True) as dba:
            assert dba.execute("SELECT source_rows, embedded_rows, queued, failed "
                               "FROM pgembed.pipeline_status").fetchall() == [(19, 19, 0, 0)]
            assert dba.execute("SELECT count(*) FROM pgembed.consistency_gaps").fetchone() == (0,)
            for forbidden in ("SELECT * FROM app.articles", f"SELECT * FROM pgembed.{name}",
                              "SELECT * FROM pgembed.embedding_cache"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    dba.execute(forbidden)
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as su:
            su.execute("DROP SCHEMA IF EXISTS pgembed, app CASCADE")
            for role in (admin, app, embedder, alice):
                su.execute(f"DROP OWNED BY {role}")
                su.execute(f"DROP ROLE {role}")
