"""The command line: verbs work end to end, and every error is one sentence, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from pgembed.cli import app

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_pipeline_create_list_worker_search_drop(conn, dsn):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes VALUES (1, 'bread and butter'), (2, 'stars at night')")
    created = cli("pipeline", "create", "notes", "body", "--model", "hash:32", "--dsn", dsn)
    assert created.exit_code == 0, created.output
    assert "notes_h32" in created.output
    assert "notes_h32" in cli("pipeline", "list", "--dsn", dsn).output
    drained = cli("worker", "--until-empty", "--dsn", dsn)
    assert drained.exit_code == 0 and "2 rows embedded" in drained.output
    found = cli("search", "notes_h32", "stars at night", "-k", "1", "--dsn", dsn)
    assert found.exit_code == 0 and "id=2" in found.output
    assert cli("pipeline", "drop", "notes_h32", "--dsn", dsn).exit_code == 0
    assert conn.execute("SELECT count(*) FROM pgembed.pipelines").fetchone()[0] == 0


def test_errors_are_one_clear_sentence(conn, dsn, empty_dsn):
    conn.execute("CREATE TABLE nokey (body text)")
    cases = {
        ("search", "nope", "x", "--dsn", dsn): "no pipeline or alias named 'nope'",
        ("pipeline", "drop", "nope", "--dsn", dsn): 'no pipeline named "nope"',
        ("pipeline", "create", "nokey", "body", "--model", "hash:8", "--dsn", dsn): "has no primary key",
        ("pipeline", "list", "--dsn", empty_dsn): "run `pgembed init` first",
        ("pipeline", "list", "--dsn", "host=/nonexistent dbname=x"): "cannot connect to PostgreSQL",
    }
    for args, message in cases.items():
        result = cli(*args)
        assert result.exit_code == 1, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_the_installed_command_prints_no_traceback_for_a_dead_server(tmp_path):
    env = {**os.environ, "PGEMBED_DSN": f"host={tmp_path} port=1 dbname=x connect_timeout=2"}
    done = subprocess.run([sys.executable, "-m", "pgembed", "pipeline", "list"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot connect to PostgreSQL" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_init_is_repeatable_and_explains_a_missing_pgvector(empty_dsn, monkeypatch):
    assert cli("init", "--dsn", empty_dsn).exit_code == 0
    again = cli("init", "--dsn", empty_dsn)
    assert again.exit_code == 0 and "revision" in again.output
    # a server without pgvector: the same CREATE EXTENSION fails as it would there
    from pgembed import migrate, schema

    migrate.downgrade(empty_dsn)
    monkeypatch.setattr(schema, "revision_sql", lambda path: "CREATE EXTENSION no_such_vector_ext")
    failed = cli("init", "--dsn", empty_dsn)
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    assert 'extension "no_such_vector_ext" is not available' in failed.output
    down = cli("init", "--dsn", "host=/nonexistent dbname=x")
    assert down.exit_code == 1 and "cannot connect to PostgreSQL" in down.output
