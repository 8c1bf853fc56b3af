"""9. Privileges and injection: the roles of roles.sql (application, a worker in
pgembed_worker, a read-only DBA in pgembed_reader) each get what they need and nothing
more; hostile schema, table and column names work; content expressions cannot smuggle
statements, other tables or replaceable functions in; lookalike objects earlier on a
search_path change nothing."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgembed import pipelines
from tests.reliability.convergence import Expect, converge
from tests.reliability.harness import FORMS, MODEL, Fleet, api_env, scalar

ROLES = Path(__file__).with_name("roles.sql")
SCHEMA = 'Sales; --'
TABLE = 'Notes "2024"'
QTABLE = '"Sales; --"."Notes ""2024"""'
CONTENT = '"Body text" || \' #\' || "select"'


@pytest.fixture
def roles(db):
    # the login roles only: the group roles pgembed_worker and pgembed_reader belong to the
    # cluster, and every database cloned from the test template holds grants to them
    for role in ("embed_worker", "embed_dba"):
        if scalar(db, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)):
            db.execute(f"DROP OWNED BY {role}")
            db.execute(f"DROP ROLE {role}")
    app = f"app_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {app} LOGIN")
    db.execute(ROLES.read_text())
    yield app
    for role in ("embed_worker", "embed_dba", app):
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("form", FORMS)
def test_roles_hostile_names_and_injection(form, dsn, db, api, tmp_path, roles, results):
    app = roles
    rows = form.pick(60, 3_000)
    schema, table = sql.Identifier(SCHEMA), sql.Identifier(SCHEMA, TABLE)
    db.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
    db.execute(sql.SQL('CREATE TABLE {} ("Tenant" text, "select" int, "Body text" text, locked boolean, '
                       'PRIMARY KEY ("Tenant", "select"))').format(table))
    db.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}, pgembed_worker").format(schema, sql.Identifier(app)))
    db.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {} TO {}").format(table, sql.Identifier(app)))
    db.execute(sql.SQL("GRANT SELECT ON {} TO pgembed_worker").format(table))
    name = pipelines.create(db, QTABLE, CONTENT, MODEL, pipelines.PipelineOptions(dimensions=16))

    # the application, with a hostile search_path full of lookalikes
    db.execute(f"CREATE SCHEMA evil AUTHORIZATION {app}")
    db.execute(f'CREATE SCHEMA "Pgembed" AUTHORIZATION {app}')
    app_dsn = make_conninfo(dsn, user=app)
    with psycopg.connect(app_dsn, autocommit=True) as a:
        a.execute("CREATE TABLE evil.outbox (pipeline text, key jsonb)")
        a.execute('CREATE TABLE "Pgembed".outbox (pipeline text, key jsonb)')
        a.execute("CREATE FUNCTION evil.jsonb_build_array(VARIADIC text[]) RETURNS jsonb "
                  "LANGUAGE sql AS $$ SELECT '[\"hijacked\"]'::jsonb $$")
        a.execute("CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE sql AS $$ SELECT $$")
        a.execute("CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'epoch'::timestamptz $$")
        a.execute('SET search_path = evil, "Pgembed", pg_catalog, public')
        a.execute("CREATE TEMP TABLE new_rows (pipeline text, key jsonb)")
        a.execute("CREATE TEMP TABLE old_rows (pipeline text, key jsonb)")
        with a.cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, false)").format(table),
                            [(t, i, f"{t} note {i} ' ; DROP TABLE x; --")
                             for i in range(rows // 3) for t in ("a'b", "x;y", "日本")])
        a.execute(sql.SQL('UPDATE {} SET "Body text" = \'changed\' WHERE "select" % 5 = 0').format(table))
        a.execute(sql.SQL('UPDATE {} SET "select" = "select" + 100000 WHERE "select" % 7 = 1').format(table))
        a.execute(sql.SQL('DELETE FROM {} WHERE "select" % 11 = 2').format(table))
        for forbidden in ("SELECT * FROM pgembed.outbox", "SELECT * FROM pgembed.embedding_cache",
                          f"SELECT * FROM pgembed.{sql.Identifier(name).as_string(a)}",
                          "SELECT pgembed.create_pipeline('evil.outbox', 'key::text', 'hash:4')",
                          "DELETE FROM pgembed.outbox"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                a.execute(forbidden)
        assert a.execute("SELECT count(*) FROM evil.outbox").fetchone()[0] == 0
        assert a.execute('SELECT count(*) FROM "Pgembed".outbox').fetchone()[0] == 0
    keys = {k[0] for (k,) in db.execute("SELECT key FROM pgembed.outbox")}
    assert keys <= {"a'b", "x;y", "日本"}, "the trigger was redirected by the application's search_path"

    # the worker, as embed_worker (in pgembed_worker), with a lookalike schema named after it
    # first on its path
    db.execute(f"CREATE SCHEMA embed_worker AUTHORIZATION {app}")
    with psycopg.connect(app_dsn, autocommit=True) as a:
        a.execute("CREATE FUNCTION embed_worker.now() RETURNS timestamptz LANGUAGE sql "
                  "AS $$ SELECT 'infinity'::timestamptz $$")
        a.execute("GRANT USAGE ON SCHEMA embed_worker TO embed_worker")
    fleet = Fleet(make_conninfo(dsn, user="embed_worker"), api_env(api), tmp_path)
    started = time.monotonic()
    try:
        worker = fleet.start(until_empty=True, batch_size=32, extra=["--no-scheduler"])
        assert worker.wait(120) == 0, worker.text()[-3000:]
    finally:
        fleet.stop_all()
    expect = Expect(name, QTABLE, ["Tenant", "select"], ["Body text", "select"],
                    lambda body, number: f"{body} #{number}")
    report = converge(db, [expect], api=api, bound=lambda ideal: ideal + rows)
    assert "InsufficientPrivilege" not in worker.text() and "permission denied" not in worker.text()

    # the DBA reads every view and nothing else; the gaps are the ones the owner sees, the
    # stale one included (the content expression evaluated for a role that cannot read it)
    db.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(table))
    db.execute(sql.SQL('UPDATE {} SET "Body text" = \'behind its back\' '
                       'WHERE ("Tenant", "select") = (\'x;y\', 3)').format(table))
    db.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(table))
    # (not the pipelines' binding views: they return no rows and are pgembed's own)
    views = [v for (v,) in db.execute("SELECT format('%I.%I', schemaname, viewname) FROM pg_views "
                                      "WHERE schemaname = 'pgembed' AND viewname !~ '^p[0-9]+_(content|cost_center)$'")]
    with psycopg.connect(make_conninfo(dsn, user="embed_dba"), autocommit=True) as dba:
        warnings: list[str] = []
        dba.add_notice_handler(lambda diag: warnings.append(diag.message_primary or ""))
        unreadable = {}
        for view in views:
            try:
                dba.execute(f"SELECT * FROM {view} LIMIT 1").fetchall()
            except psycopg.errors.InsufficientPrivilege as error:
                unreadable[view] = error.diag.message_primary
        assert not unreadable, f"views the DBA cannot read: {unreadable}"
        gaps = dba.execute("SELECT key, kind FROM pgembed.consistency_gaps").fetchall()
        assert gaps == [(["x;y", "3"], "stale")], gaps
        status = dba.execute("SELECT source_rows, embedded_rows, stale FROM pgembed.pipeline_status "
                             "WHERE pipeline = %s", (name,)).fetchone()
        assert status == (report.rows, report.rows, None), status  # gap counts: from an audit
        assert warnings == [], warnings
        forbidden = ["SELECT * FROM pgembed.outbox", "SELECT * FROM pgembed.pipelines",
                     "SELECT * FROM pgembed.embedding_cache", "SELECT * FROM pgembed.failures",
                     f"SELECT * FROM pgembed.{sql.Identifier(name).as_string(dba)}",
                     f"SELECT * FROM {QTABLE}", "DELETE FROM pgembed.usage",
                     f"SELECT pgembed.drop_pipeline({sql.Literal(name).as_string(dba)})",
                     f"SELECT pgembed.queue_all({sql.Literal(name).as_string(dba)})",
                     "SELECT pgembed.retry_failures()",
                     "SELECT * FROM pgembed.claim('dba', gen_random_uuid(), 10, 60)",
                     f"SELECT pgembed.create_pipeline('{QTABLE}', 'locked::text', 'hash:4')"]
        for statement in forbidden:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                dba.execute(statement)

    # content expressions: one expression over this table's columns, calling nothing replaceable
    db.execute("CREATE FUNCTION evil.shout(text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT upper($1) $$")
    db.execute(f"ALTER FUNCTION evil.shout(text) OWNER TO {app}")
    db.execute("CREATE FUNCTION public.stamp(text) RETURNS text LANGUAGE sql AS $$ SELECT $1 $$")  # VOLATILE
    db.execute("CREATE FUNCTION public.trusted(text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT $1 $$")
    refused = {
        '"Body text"); DROP TABLE pgembed.outbox; --': "invalid content",
        '"Body text" || (SELECT string_agg(usename, \',\') FROM pg_user)': "not pg_user",
        '"Body text" || (SELECT 1)::text': "subquery",
        '(SELECT "Body text" FROM pgembed.outbox LIMIT 1)': "may read only columns",
        'evil.shout("Body text")': "owned by",
        'public.stamp("Body text")': "VOLATILE",
        "pg_catalog.pg_read_file('/etc/passwd')": "VOLATILE",
        '"Body text" || random()::text': "VOLATILE",
    }
    for content, why in refused.items():
        with pytest.raises(pipelines.PipelineError) as refusal:
            pipelines.create(db, QTABLE, content, "hash:8")
        assert why in str(refusal.value), (content, str(refusal.value))
    assert scalar(db, "SELECT to_regclass('pgembed.outbox')") is not None
    accepted = pipelines.create(db, QTABLE, 'public.trusted("Body text")', "hash:8")
    pipelines.drop(db, accepted)
    results.add("9 privileges & injection", form.name,
                load=f"{rows} rows written by an application role, embedded by pgembed_worker",
                faults="hostile search_path (lookalike functions, tables, temp tables, $user schema), "
                       f"{len(forbidden)} forbidden statements as the DBA, {len(refused)} hostile contents",
                inputs="schema, table, column and key values with quotes, semicolons, comments, CJK",
                report=report, seconds=time.monotonic() - started, views_the_dba_cannot_read=len(unreadable))
