"""A table owner whom pgembed does not trust cannot make the worker run the owner's code:
not through a row-level-security policy, not by swapping the table for a view of the same
name. The worker reads only the table the pipeline was created on, and no table whose
row-level security applies to it; the rows fail with pgembed's sentence instead. The audit
skips, with a warning, a pipeline whose source its owner may not read the same way."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgembed import migrate, pipelines
from tests.conftest import drain

SPY = """CREATE FUNCTION app.spy() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN INSERT INTO app.spied VALUES (current_user); RETURN true; END $$"""


@pytest.fixture
def roles(conn):
    suffix = uuid.uuid4().hex[:8]
    owner, worker = f"owner_{suffix}", f"embedder_{suffix}"
    conn.execute(f"CREATE ROLE {owner} LOGIN")
    conn.execute(f"CREATE ROLE {worker} LOGIN IN ROLE pgembed_worker")
    conn.execute(f"CREATE SCHEMA app AUTHORIZATION {owner}")
    conn.execute(f"GRANT USAGE ON SCHEMA app TO {worker}")
    yield owner, worker
    for role in (owner, worker):
        conn.execute(f"DROP OWNED BY {role} CASCADE")
        conn.execute(f"DROP ROLE {role}")


def _owner_table(conn, dsn, owner, worker) -> psycopg.Connection:
    app = psycopg.connect(make_conninfo(dsn, user=owner), autocommit=True)
    app.execute("CREATE TABLE app.docs (id int PRIMARY KEY, body text)")
    app.execute("CREATE TABLE app.spied (who text)")
    app.execute("GRANT INSERT ON app.spied TO PUBLIC")
    app.execute(f"GRANT SELECT ON app.docs TO {worker}")
    app.execute("INSERT INTO app.docs VALUES (1, 'one'), (2, 'two')")
    app.execute(SPY)
    return app


def _worker_errors(conn) -> list[str]:
    return [r[0] for r in conn.execute("SELECT error FROM pgembed.failures ORDER BY key")]


def test_a_policy_added_later_never_runs_as_the_worker(conn, dsn, roles):
    owner, worker = roles
    with _owner_table(conn, dsn, owner, worker) as app:
        pipelines.create(conn, "app.docs", "body", "hash:8")
        app.execute("CREATE POLICY snoop ON app.docs USING (app.spy())")
        app.execute("ALTER TABLE app.docs ENABLE ROW LEVEL SECURITY")
        drain(make_conninfo(dsn, user=worker), max_attempts=1)
        assert app.execute("SELECT count(*) FROM app.spied").fetchone() == (0,), "the owner's code ran"
    errors = _worker_errors(conn)
    assert len(errors) == 2 and all("row-level security" in e for e in errors), errors
    assert conn.execute("SELECT count(*) FROM pgembed.docs_h8").fetchone() == (0,)


@pytest.mark.parametrize("follows", [True, False], ids=["followed", "event-trigger-off"])
def test_a_view_in_place_of_the_table_is_never_read(conn, dsn, roles, follows):
    """With the event trigger the pipeline follows its renamed table and never looks at the
    view; without it the reader sees the name no longer means its table and reads nothing."""
    owner, worker = roles
    if not follows:
        conn.execute("ALTER EVENT TRIGGER pgembed_follow_source_ddl DISABLE")
    with _owner_table(conn, dsn, owner, worker) as app:
        pipelines.create(conn, "app.docs", "body", "hash:8")
        app.execute("ALTER TABLE app.docs RENAME TO docs_old")
        app.execute("CREATE VIEW app.docs AS SELECT id, body FROM app.docs_old WHERE app.spy()")
        app.execute(f"GRANT SELECT ON app.docs TO {worker}")
        drain(make_conninfo(dsn, user=worker), max_attempts=1)
        assert app.execute("SELECT count(*) FROM app.spied").fetchone() == (0,), "the view ran as the worker"
    errors = _worker_errors(conn)
    if follows:
        assert errors == [] and conn.execute("SELECT count(*) FROM pgembed.docs_h8").fetchone() == (2,)
    else:
        assert len(errors) == 2 and all("no longer the table the pipeline was created on" in e
                                        for e in errors), errors


def test_row_level_security_is_a_problem_for_whom_it_applies_to(conn, dsn, roles):
    owner, worker = roles
    conn.execute("CREATE TABLE plain (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO plain VALUES (1, 'a')")
    conn.execute("SELECT pgembed.create_pipeline('plain', 'body', 'hash:8', backfill => false)")
    with _owner_table(conn, dsn, owner, worker) as app:
        conn.execute("SELECT pgembed.create_pipeline('app.docs', 'body', 'hash:8', backfill => false)")
        app.execute("CREATE POLICY snoop ON app.docs USING (true)")
        app.execute("ALTER TABLE app.docs ENABLE ROW LEVEL SECURITY")
        app.execute("ALTER TABLE app.docs FORCE ROW LEVEL SECURITY")
    rows = conn.execute("SELECT pipeline, kind FROM pgembed.gaps() ORDER BY pipeline").fetchall()
    assert ("plain_h8", "missing") in rows, rows  # the owner here is a superuser: RLS does not apply
    with psycopg.connect(make_conninfo(dsn, user=worker), autocommit=True) as as_worker:
        problem = as_worker.execute("SELECT pgembed.source_problem(p) FROM pgembed.pipelines p "
                                    "WHERE name = 'docs_h8'").fetchone()[0]
    assert "has row-level security" in problem, problem
    assert conn.execute("SELECT pgembed.source_problem(p) FROM pgembed.pipelines p").fetchall() == [(None,), (None,)]


def test_a_table_with_row_level_security_does_not_stop_a_non_superuser_audit(empty_dsn, template):
    """pgembed's owner is no superuser here (README, "Privileges and roles"): row-level
    security on one source applies to it, and the audit of every other pipeline goes on.
    (`template`: the group roles exist in the cluster, as after a first init.)"""
    tag = uuid.uuid4().hex[:6]
    admin, app = f"admin_{tag}", f"app_{tag}"
    database = conninfo_to_dict(empty_dsn)["dbname"]
    with psycopg.connect(empty_dsn, autocommit=True) as su:
        su.execute("CREATE EXTENSION vector")
        su.execute(f"CREATE ROLE {admin} LOGIN")
        su.execute(f"CREATE ROLE {app} LOGIN")
        su.execute(f'GRANT CREATE ON DATABASE "{database}" TO {admin}')
        su.execute(f"GRANT CREATE ON SCHEMA public TO {admin}")
        su.execute(f"CREATE SCHEMA app AUTHORIZATION {app}")
    try:
        migrate.upgrade(make_conninfo(empty_dsn, user=admin))
        with psycopg.connect(make_conninfo(empty_dsn, user=app), autocommit=True) as a:
            for table in ("open", "guarded"):
                a.execute(f"CREATE TABLE app.{table} (id int PRIMARY KEY, body text)")
                a.execute(f"INSERT INTO app.{table} VALUES (1, 'x')")
                a.execute(f"GRANT SELECT, TRIGGER, MAINTAIN ON app.{table} TO {admin}")
            a.execute(f"GRANT USAGE ON SCHEMA app TO {admin}")
        with psycopg.connect(make_conninfo(empty_dsn, user=admin), autocommit=True) as owner:
            for table in ("open", "guarded"):
                owner.execute(f"SELECT pgembed.create_pipeline('app.{table}', 'body', 'hash:8', backfill => false)")
        with psycopg.connect(make_conninfo(empty_dsn, user=app), autocommit=True) as a:
            a.execute("CREATE POLICY mine ON app.guarded USING (true)")
            a.execute("ALTER TABLE app.guarded ENABLE ROW LEVEL SECURITY")
        with psycopg.connect(make_conninfo(empty_dsn, user=admin), autocommit=True) as owner:
            notices: list[str] = []
            owner.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            gaps = owner.execute("SELECT pipeline, kind FROM pgembed.gaps()").fetchall()
            status = owner.execute("SELECT pipeline, source_rows FROM pgembed.pipeline_status "
                                   "ORDER BY pipeline").fetchall()
        assert gaps == [("open_h8", "missing")], gaps
        assert status == [("guarded_h8", None), ("open_h8", 1)], status
        assert any("guarded_h8" in n and "row-level security" in n for n in notices), notices
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as su:
            su.execute("DROP SCHEMA IF EXISTS pgembed, app CASCADE")
            for role in (admin, app):
                su.execute(f"DROP OWNED BY {role}")
                su.execute(f"DROP ROLE {role}")
