"""`pgembed failures`: by class, as JSON for scripts, and a table that fits 80 columns with
every timestamp and key whole."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import psycopg
import pytest
from typer.testing import CliRunner

from pgembed.cli import app
from tests.conftest import drain
from tests.test_failure_classes import failures, one_table

runner = CliRunner()
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
LONG_KEY = "order-2026-12-01-" + "x" * 20


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def parked(conn: psycopg.Connection, dsn: str, fake_api) -> psycopg.Connection:
    """A content error (row 2) and a rejected input (row 3), both parked; row 1 embedded."""
    one_table(conn, ["ok", "", "poison " + "and a long message " * 6],
              content="body || (1 / length(body))::text")
    fake_api.always_reject("poison", message="Invalid 'input': " + "this input is not acceptable " * 5)
    drain(dsn, max_attempts=5)
    fake_api.always_reject(None)
    return conn


def test_class_filters_and_retry_requeues_only_that_class(parked, dsn):
    result = cli("failures", "--class", "input_rejected", "--dsn", dsn)
    assert result.exit_code == 0, result.output
    assert "input_rejected" in result.output and "content_error" not in result.output
    result = cli("failures", "--class", "input_rejected", "--retry", "--dsn", dsn)
    assert result.exit_code == 0, result.output
    assert "1 parked row re-queued" in result.output
    assert parked.execute("SELECT key->>0, purpose FROM pgembed.outbox").fetchall() == [("3", "retry")]
    assert failures(parked)["2"] == ("content_error", 1, True), "the other class stays parked"


def test_an_unknown_class_is_an_error_that_lists_the_classes(parked, dsn):
    result = cli("failures", "--class", "nope", "--dsn", dsn)
    assert result.exit_code == 1
    assert "no failure class 'nope'; the classes are bad_vector, content_error" in result.output


def test_json_is_one_document_on_stdout(parked, dsn):
    done = subprocess.run([sys.executable, "-m", "pgembed", "failures", "--json", "--retry",
                           "--class", "content_error", "--dsn", dsn],
                          capture_output=True, text=True, timeout=60, env=os.environ)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["requeued"] == 1
    rows = {r["key"][0]: r for r in document["failures"]}
    assert set(rows) == {"2"}
    assert rows["2"]["class"] == "content_error" and rows["2"]["attempts"] == 1
    assert rows["2"]["error"] == "content expression failed: division by zero"
    assert TIMESTAMP.match(rows["2"]["parked_at"].replace("T", " "))


def test_the_table_fits_80_columns_with_whole_timestamps_and_keys(conn, dsn, fake_api):
    conn.execute("CREATE TABLE orders (id text PRIMARY KEY, body text)")
    conn.execute("INSERT INTO orders VALUES (%s, ''), ('short', '')", (LONG_KEY,))
    conn.execute("SELECT pgembed.create_pipeline('orders', 'body || (1 / length(body))::text', 'hash:8')")
    drain(dsn, max_attempts=5)
    done = subprocess.run([sys.executable, "-m", "pgembed", "failures", "--dsn", dsn], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, done.stdout
    rows = [line for line in lines if TIMESTAMP.search(line)]
    assert len(rows) == 2, "a whole timestamp on the line of each failure:\n" + done.stdout
    assert any(LONG_KEY in line for line in rows) and any("short" in line for line in rows), done.stdout
    assert "content_error" in done.stdout


def test_no_failures_says_so(dsn):
    result = cli("failures", "--dsn", dsn)
    assert result.exit_code == 0 and "no failures" in result.output
