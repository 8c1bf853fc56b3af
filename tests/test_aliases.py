"""Stable search names (issue 14): an alias resolves to its pipeline in one place
(pgembed.resolve_pipeline) for SQL, Python, the Client and the command line; a repoint is one
transaction that a concurrent searcher never sees half done; alias and pipeline names never
collide; a pipeline an alias points at cannot be dropped."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from typer.testing import CliRunner

from pgembed import aliases, db, pipelines, search
from pgembed.cli import app
from pgembed.client import Client
from pgembed.pipelines import PipelineError
from pgembed.providers.hashing import hash_vector
from tests.conftest import drain


@pytest.fixture
def two_pipelines(conn, dsn):
    """One table embedded by two models of different dimensions: 16 (old) and 8 (new)."""
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL)")
    conn.execute("INSERT INTO docs SELECT g, 'lighthouse ' || g FROM generate_series(1, 20) g")
    old = pipelines.create(conn, "docs", "body", "hash:16")
    new = pipelines.create(conn, "docs", "body", "hash:8")
    drain(dsn)
    return old, new


def alias_row(conn, name):
    return conn.execute("SELECT pipeline, previous FROM pgembed.aliases WHERE name = %s", (name,)).fetchone()


def test_set_repoint_and_resolve(conn, two_pipelines):
    old, new = two_pipelines
    aliases.set_alias(conn, "articles", old)
    assert alias_row(conn, "articles") == (old, None)
    assert aliases.resolve(conn, "articles") == old
    assert aliases.resolve(conn, old) == old  # a pipeline's own name resolves to itself
    aliases.set_alias(conn, "articles", new)
    assert alias_row(conn, "articles") == (new, old)
    aliases.set_alias(conn, "articles", new)  # no change: previous is kept
    assert alias_row(conn, "articles") == (new, old)
    aliases.set_alias(conn, "articles", old)  # the rollback
    assert alias_row(conn, "articles") == (old, new)
    assert [a["name"] for a in aliases.list_all(conn)] == ["articles"]
    with pytest.raises(PipelineError, match="no pipeline or alias named 'nope'"):
        aliases.resolve(conn, "nope")


def test_search_through_an_alias_from_sql_python_client_and_cli(conn, dsn, two_pipelines):
    new = two_pipelines[1]
    aliases.set_alias(conn, "articles", new)
    rows = conn.execute("SELECT key FROM pgembed.search('articles', %s::vector, 3)",
                        (str(hash_vector("lighthouse 7", 8)),)).fetchall()
    assert rows[0] == ({"id": 7},)
    hits, vector = search.search_with_vector(conn, "articles", "lighthouse 7", k=3)
    assert len(vector) == 8 and hits[0].key == {"id": 7}  # embedded with the new pipeline's model
    with Client(dsn) as client:
        assert client.search("articles", "lighthouse 7", k=1)[0].key == {"id": 7}
        client.set_alias("news", new)
        assert [a["name"] for a in client.aliases()] == ["articles", "news"]
        client.drop_alias("news")
    found = CliRunner().invoke(app, ["search", "articles", "lighthouse 7", "-k", "1", "--dsn", dsn],
                               catch_exceptions=False)
    assert found.exit_code == 0 and "id=7" in found.output
    usage = conn.execute("SELECT DISTINCT pipeline FROM pgembed.usage WHERE purpose = 'query'").fetchall()
    assert usage == [(new,)]  # the query's cost is the pipeline's that answered


def test_alias_and_pipeline_names_never_collide(conn, two_pipelines):
    old, new = two_pipelines
    with pytest.raises(PipelineError, match=f"'{new}' is the name of a pipeline"):
        aliases.set_alias(conn, new, old)
    aliases.set_alias(conn, "articles", old)
    with pytest.raises(PipelineError, match='"articles" is the name of an alias'):
        pipelines.create(conn, "docs", "body", "hash:32", pipelines.PipelineOptions(name="articles"))
    with pytest.raises(PipelineError, match="an alias points at a pipeline, not at another alias"):
        aliases.set_alias(conn, "news", "articles")
    with pytest.raises(PipelineError, match="alias name 'outbox' is taken by pgembed's table"):
        aliases.set_alias(conn, "outbox", old)
    with pytest.raises(PipelineError, match="is not an alias name"):
        aliases.set_alias(conn, " padded", old)
    assert [a["name"] for a in aliases.list_all(conn)] == ["articles"]
    assert conn.execute("SELECT count(*) FROM pgembed.pipelines").fetchone() == (2,)


def test_a_pipeline_an_alias_points_at_cannot_be_dropped(conn, two_pipelines):
    old, new = two_pipelines
    aliases.set_alias(conn, "articles", old)
    with pytest.raises(PipelineError, match=f'pipeline "{old}" is what alias "articles" points at'):
        pipelines.drop(conn, old)
    assert conn.execute(f'SELECT count(*) FROM pgembed."{old}"').fetchone() == (20,)  # nothing lost
    aliases.set_alias(conn, "articles", new)
    pipelines.drop(conn, old)  # now only the alias's previous: that is allowed, and forgotten
    assert alias_row(conn, "articles") == (new, None)
    aliases.drop(conn, "articles")
    with pytest.raises(PipelineError, match="no pipeline or alias named 'articles'"):
        search.search(conn, "articles", "lighthouse")
    with pytest.raises(PipelineError, match="no alias named 'articles'"):
        aliases.drop(conn, "articles")
    pipelines.drop(conn, new)


def test_the_alias_view_follows_the_alias_and_keeps_its_grants(conn, two_pipelines):
    old, new = two_pipelines
    aliases.set_alias(conn, "articles", old)
    assert conn.execute("SELECT count(*), min(vector_dims(embedding)) FROM pgembed.articles").fetchone() == (20, 16)
    conn.execute("GRANT SELECT ON pgembed.articles TO pgembed_worker")
    aliases.set_alias(conn, "articles", new)
    assert conn.execute("SELECT count(*), min(vector_dims(embedding)) FROM pgembed.articles").fetchone() == (20, 8)
    assert conn.execute("SELECT has_table_privilege('pgembed_worker', 'pgembed.articles', 'SELECT'), "
                        "has_table_privilege('pgembed_reader', 'pgembed.articles', 'SELECT')").fetchone() \
        == (True, False)  # the reader sees no vectors
    aliases.drop(conn, "articles")
    assert conn.execute("SELECT to_regclass('pgembed.articles')").fetchone() == (None,)


def test_a_repoint_in_a_transaction_never_fails_a_concurrent_search(conn, dsn, two_pipelines):
    """The searcher runs in its own session while the other repoints, each repoint held open
    until the searcher has searched inside it, then committed: every search returns rows,
    from one pipeline or the other, never an error."""
    old, new = two_pipelines
    aliases.set_alias(conn, "articles", old)
    progress = threading.Condition()
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def searcher() -> None:
        with db.connect(dsn) as other:
            while not done.is_set():
                answer = 0
                try:
                    hits, vector = search.search_with_vector(other, "articles", "lighthouse 3", k=3)
                    answer = len(vector) if len(hits) == 3 else 0
                except BaseException as error:
                    errors.append(error)
                with progress:
                    seen.append(answer)
                    progress.notify_all()
                if errors:
                    return

    def two_more_searches() -> None:
        """Until a search that began after now has finished (the hang guard is no assertion)."""
        with progress:
            wanted = len(seen) + 2
            progress.wait_for(lambda: len(seen) >= wanted or errors, timeout=120)

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        for target in [new, old] * 10:
            with psycopg.connect(dsn) as repointer:
                repointer.execute("SELECT pgembed.set_alias('articles', %s)", (target,))
                two_more_searches()  # searches while the repoint is open
                repointer.commit()
            two_more_searches()  # and after it
    finally:
        done.set()
        thread.join(120)
    assert not errors, errors
    assert 0 not in seen  # no search came back empty
    assert set(seen) == {8, 16}


def test_alias_views_survive_the_definitions_of_an_upgrade(conn, two_pipelines):
    """An upgrade re-applies sql/ and drops the views it did not make (refresh.sql): the
    alias's view is made again, with its grants, and the reader still cannot see it."""
    from pgembed.schema import definitions_sql

    aliases.set_alias(conn, "articles", two_pipelines[0])
    conn.execute("GRANT SELECT ON pgembed.articles TO pgembed_worker")
    with conn.transaction():
        conn.execute(definitions_sql())
    assert conn.execute("SELECT count(*) FROM pgembed.articles").fetchone() == (20,)
    assert conn.execute("SELECT has_table_privilege('pgembed_worker', 'pgembed.articles', 'SELECT'), "
                        "has_table_privilege('pgembed_reader', 'pgembed.articles', 'SELECT')").fetchone() \
        == (True, False)


def test_the_reader_sees_aliases_and_runs_not_vectors(conn, dsn, two_pipelines):
    from psycopg.conninfo import make_conninfo

    aliases.set_alias(conn, "articles", two_pipelines[0])
    role = f"reader_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE pgembed_reader")
    try:
        with psycopg.connect(make_conninfo(dsn, user=role), autocommit=True) as reader:
            assert reader.execute("SELECT name, pipeline FROM pgembed.aliases").fetchall() == [
                ("articles", two_pipelines[0])]
            for readable in ("pgembed.eval_runs", "pgembed.eval_sets", "pgembed.eval_history",
                             "pgembed.eval_regressions", "pgembed.eval_set_summary"):
                assert reader.execute(f"SELECT count(*) FROM {readable}").fetchone() == (0,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute("SELECT * FROM pgembed.articles")
    finally:
        conn.execute(f"DROP OWNED BY {role} CASCADE")
        conn.execute(f"DROP ROLE {role}")


def test_the_alias_view_follows_its_source_s_primary_key(conn, two_pipelines):
    """A retyped or renamed primary key of the source changes the pipeline's table under the
    alias's view: the application's ALTER TABLE goes through, the view comes back over the
    new columns with its grants."""
    old = two_pipelines[0]
    aliases.set_alias(conn, "articles", old)
    conn.execute("GRANT SELECT ON pgembed.articles TO pgembed_worker")
    conn.execute("ALTER TABLE docs ALTER COLUMN id TYPE bigint")
    conn.execute("ALTER TABLE docs RENAME COLUMN id TO doc_id")
    row = conn.execute("SELECT pg_typeof(doc_id)::text, count(*) FROM pgembed.articles GROUP BY 1").fetchone()
    assert row == ("bigint", 20)
    assert conn.execute("SELECT has_table_privilege('pgembed_worker', 'pgembed.articles', 'SELECT')").fetchone() \
        == (True,)
    assert search.search(conn, "articles", "lighthouse 4", k=1)[0].key == {"doc_id": 4}


def test_a_query_of_the_alias_view_waits_for_a_repoint_and_reads_the_new_pipeline(conn, dsn, two_pipelines):
    """The view is made anew in the repoint's transaction: a query of it meanwhile waits for
    the commit (never an error), then reads the new pipeline's rows."""
    old, new = two_pipelines
    aliases.set_alias(conn, "articles", old)
    answer: list[object] = []
    with psycopg.connect(dsn) as repointer, psycopg.connect(dsn, autocommit=True) as reader:
        reader_pid = reader.info.backend_pid

        def read() -> None:
            try:
                answer.append(reader.execute("SELECT count(*), min(vector_dims(embedding)) FROM pgembed.articles"
                                             ).fetchone())
            except psycopg.Error as error:
                answer.append(error)

        repointer.execute("SELECT pgembed.set_alias('articles', %s)", (new,))
        thread = threading.Thread(target=read)
        thread.start()
        for _ in range(6000):  # until the reader waits on the view's lock (a hang guard, not a timing)
            if conn.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted)",
                            (reader_pid,)).fetchone()[0]:
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("the reader never waited for the repoint")
        repointer.commit()
        thread.join(60)
    assert answer == [(20, 8)]


def test_dropping_the_content_column_with_cascade_stops_at_an_alias(conn, two_pipelines):
    """DROP COLUMN ... CASCADE takes the pipelines that read the column, except one an alias
    points at: the statement is refused, naming the alias, and nothing is lost."""
    old = two_pipelines[0]
    aliases.set_alias(conn, "articles", old)
    with pytest.raises(psycopg.Error, match=f'pipeline "{old}" is what alias "articles" points at'):
        conn.execute("ALTER TABLE docs DROP COLUMN body CASCADE")
    assert conn.execute("SELECT count(*) FROM pgembed.pipelines").fetchone() == (2,)
    assert search.search(conn, "articles", "lighthouse 2", k=1)[0].key == {"id": 2}
    aliases.drop(conn, "articles")
    conn.execute("ALTER TABLE docs DROP COLUMN body CASCADE")
    assert conn.execute("SELECT count(*) FROM pgembed.pipelines").fetchone() == (0,)
