"""Issue 12, a CLI that fits its users: tables that fit 80 columns without losing a name,
--json for scripts, which database a command uses (libpq's variables count, the embedded
server only when asked for or when nothing is configured), search that says what it
searched, and `pipeline create` that does not make a second pipeline unasked."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from typer.testing import CliRunner, Result

from pgembed import db
from pgembed.cli import app, out
from tests.conftest import drain

runner = CliRunner()
WIDTH = 80
# the variables libpq reads to find a database, which count as configuration (README: Command line)
LIBPQ_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE",
                   "PGSERVICE", "PGSERVICEFILE")
LONG = "customer_support_tickets"  # its default pipeline name is 29 characters


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 80-column terminal: COLUMNS for rich's new consoles, and the console commands print to."""
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setattr(out, "width", WIDTH)


@pytest.fixture
def nothing_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No --dsn, no PGEMBED_DSN, no PG* variable; the embedded server's data directory a
    temporary one (yielded), so a command that starts it by mistake harms nothing: that
    server is stopped afterwards, by the pid in its postmaster.pid."""
    for name in ("PGEMBED_DSN", *LIBPQ_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "embedded"
    monkeypatch.setenv("PGEMBED_DATA_DIR", str(data))
    yield data
    pid_file = data / "postmaster.pid"
    if pid_file.exists():
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)  # fast shutdown


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def assert_fits(result: Result, width: int = WIDTH) -> None:
    for line in (result.stdout + result.stderr).splitlines():
        assert len(line) <= width, f"{len(line)} columns: {line!r}"
    assert "…" not in result.stdout, result.stdout


def two_tables(conn: psycopg.Connection) -> None:
    """`articles` with two pipelines of one model, and a table whose pipeline name is long."""
    for table in ("articles", LONG):
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, title text, body text)")
        conn.execute(f"INSERT INTO {table} SELECT i, 'title ' || i, 'bread and butter ' || i "
                     "FROM generate_series(1, 5) i")


def test_status_costs_search_audit_and_pipeline_list_fit_80_columns(conn, dsn, narrow):
    two_tables(conn)
    for table, content in (("articles", "title || body"), ("articles", "title || body"), (LONG, "body")):
        conn.execute("SELECT pgembed.create_pipeline(%s, %s, 'hash:384')", (table, content))
    drain(dsn)
    names = ["articles_h384", "articles_h384_2", f"{LONG}_h384"]
    last = conn.execute("SELECT max(embedded_at) FROM pgembed.articles_h384").fetchone()[0]
    status = cli("status", "--dsn", dsn)
    assert status.exit_code == 0
    assert_fits(status)
    for name in names:
        assert status.stdout.count(f" {name} ") == 3, (name, status.stdout)  # one row in each table
    assert last.strftime("%Y-%m-%d %H:%M:%S") in status.stdout
    for args in (("costs",), ("search", f"{LONG}_h384", "bread and butter", "-k", "2"), ("audit",),
                 ("pipeline", "list")):
        shown = cli(*args, "--dsn", dsn)
        assert shown.exit_code == 0, shown.output
        assert_fits(shown)
        if args[0] != "audit":
            assert f"{LONG}_h384" in shown.stdout, shown.stdout
    costs = cli("costs", "--dsn", dsn).stdout
    assert all(name in costs for name in names) and "total" in costs and "usd" in costs
    for args in (("costs", "--share"), ("costs", "--by", "source")):
        assert_fits(cli(*args, "--dsn", dsn))
    out.width = 50  # narrower still: one record per row, every name whole on a line of its own
    for args in (("status",), ("costs", "--by", "cost-center")):
        records = cli(*args, "--dsn", dsn)
        assert_fits(records, 50)
        assert all(name in records.stdout.splitlines() or f"pipeline: {name}" in records.stdout
                   for name in names), records.stdout


def test_json_on_costs_search_and_audit(conn, dsn):
    two_tables(conn)
    cli("pipeline", "create", "articles", "title || body", "--model", "hash:64", "--dsn", dsn)
    drain(dsn)
    found = json.loads(cli("search", "articles_h64", "bread", "-k", "2", "--json", "--dsn", dsn).stdout)
    assert set(found) == {"pipeline", "target", "query", "k", "filter", "source_rows", "embedded_rows", "empty",
                          "queued", "hits"}
    assert (found["source_rows"], found["embedded_rows"], len(found["hits"])) == (5, 5, 2)
    assert set(found["hits"][0]) == {"key", "distance", "chunk"} and "id" in found["hits"][0]["key"]
    costs = json.loads(cli("costs", "--json", "--dsn", dsn).stdout)
    assert set(costs) == {"days", "by", "top", "spend", "anomalies", "source_anomalies", "cache"}
    assert costs["by"] == "purpose"
    [backfill] = [r for r in costs["spend"] if r["purpose"] == "backfill"]
    assert backfill["pipeline"] == "articles_h64" and backfill["inputs"] == 5 and isinstance(backfill["usd"], int)
    run = json.loads(cli("audit", "--json", "--dsn", dsn).stdout)
    assert (run["missing"], run["orphaned"], run["stale"], run["failed"]) == (0, 0, 0, 0) and run["id"] >= 1


def test_libpq_variables_are_configuration(conn, dsn, nothing_configured, monkeypatch):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', name => 'reached_by_libpq')")
    variables = {"host": "PGHOST", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER"}
    for key, value in conninfo_to_dict(dsn).items():
        if key in variables:
            monkeypatch.setenv(variables[key], str(value))
    listed = cli("pipeline", "list")
    assert listed.exit_code == 0 and "reached_by_libpq" in listed.stdout, listed.output
    assert "embedded" not in listed.stderr
    conn.execute("INSERT INTO notes VALUES (1, 'a note')")
    drained = cli("worker", "--until-empty")  # every part of the worker reaches it through libpq too
    assert drained.exit_code == 0 and "1 rows embedded" in drained.stdout, drained.output
    resolved = db.resolve(None)
    assert (resolved.dsn, resolved.embedded) == ("", False) and "PGHOST" in resolved.source
    assert not (nothing_configured / "PG_VERSION").exists(), "no embedded server was started"


def test_a_worker_with_nothing_configured_refuses(nothing_configured):
    refused = cli("worker", "--until-empty")
    assert refused.exit_code == 2, refused.output
    assert "no database configured" in refused.stderr and "--embedded" in refused.stderr
    assert not (nothing_configured / "PG_VERSION").exists(), "no embedded server was started"


def test_dsn_prints_the_configured_database_without_its_password(conn, dsn, monkeypatch):
    name = conn.execute("SELECT current_database()").fetchone()[0]
    monkeypatch.setenv("PGEMBED_DSN", f"{dsn} password=s3cret-pw")  # the test server trusts: ignored
    printed = cli("dsn")
    assert printed.exit_code == 0 and "s3cret-pw" not in printed.output
    assert "password is left out" in printed.stderr
    [line] = printed.stdout.splitlines()
    with psycopg.connect(line) as other:
        assert other.execute("SELECT current_database()").fetchone()[0] == name
    assert "password=s3cret-pw" in cli("dsn", "--show-password").stdout


def test_search_says_how_much_is_embedded_and_refuses_an_empty_text(conn, dsn):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes SELECT i, 'note ' || i FROM generate_series(1, 3) i")
    cli("pipeline", "create", "notes", "body", "--model", "hash:16", "--dsn", dsn)
    nothing = cli("search", "notes_h16", "note", "--dsn", dsn)
    assert nothing.exit_code == 0 and "nothing in notes_h16 is embedded yet (3 rows queued)" in nothing.stderr
    assert "no results" in nothing.stdout
    drain(dsn)
    conn.execute("INSERT INTO notes VALUES (4, 'note 4'), (5, 'note 5')")
    partial = cli("search", "notes_h16", "note", "--dsn", dsn)
    assert "only 3 of 5 rows of notes_h16 are embedded (2 queued)" in partial.stderr, partial.output
    drain(dsn)
    assert cli("search", "notes_h16", "note", "--dsn", dsn).stderr == ""
    for text in ("", "   "):
        empty = cli("search", "notes_h16", text, "--dsn", dsn)
        assert empty.exit_code == 2 and "the search text is empty" in empty.stderr, empty.output


def test_pipeline_create_takes_index_options_and_refuses_a_duplicate(conn, dsn):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    create = ("pipeline", "create", "notes", "body", "--model", "hash:16", "--dsn", dsn)
    first = cli(*create, "--index-options", '{"m": 8, "ef_construction": 32}')
    assert first.exit_code == 0, first.output
    again = cli(*create)
    assert again.exit_code == 1 and "notes_h16 already embeds this content of notes" in again.stderr
    assert "--another" in again.stderr
    assert cli(*create, "--another").exit_code == 0
    assert cli(*create, "--name", "notes_third", "--index", "ivfflat", "--index-options", '{"lists": 4}'
               ).exit_code == 0
    rows = conn.execute("SELECT name, index_type, index_options FROM pgembed.pipelines ORDER BY name").fetchall()
    assert rows == [("notes_h16", "hnsw", {"m": 8, "ef_construction": 32}), ("notes_h16_2", "hnsw", {}),
                    ("notes_third", "ivfflat", {"lists": 4})]
    bad = cli(*create, "--another", "--index-options", "{m")
    assert bad.exit_code == 1 and "--index-options must be a JSON object" in bad.stderr

