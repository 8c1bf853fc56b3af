"""`pgembed status --json` for scripts and `--check` for monitoring: exit 1, saying why, on
parked failures, gaps in the latest audit, or a stuck queue."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pgembed.cli import app
from tests.conftest import drain

runner = CliRunner()


def status(dsn: str, *args: str):
    return runner.invoke(app, ["status", *args, "--dsn", dsn])


def test_status_json_and_check(conn, dsn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs VALUES (1, 'one'), (2, 'two'), (3, '')")
    conn.execute("SELECT pgembed.create_pipeline('docs', 'body || (1 / length(body))::text', 'hash:8', "
                 "name => 'docs')")
    stuck = status(dsn, "--check", "--stuck-after", "1s")
    assert stuck.exit_code == 0, "queued for less than a second is not stuck"
    conn.execute("UPDATE pgembed.outbox SET queued_at = now() - interval '2 hours'")
    stuck = status(dsn, "--check", "--stuck-after", "1h")
    assert stuck.exit_code == 1 and "3 rows queued" in stuck.output and "is a worker running" in stuck.output
    drain(dsn, max_attempts=1)
    failed = status(dsn, "--check")
    assert failed.exit_code == 1 and "docs: 1 rows failed and are parked" in failed.output, failed.output
    rows = json.loads(status(dsn, "--json").stdout)
    assert [(r["pipeline"], r["embedded_rows"], r["failed"]) for r in rows] == [("docs", 2, 1)]
    conn.execute("DELETE FROM docs WHERE id = 3")
    healthy = status(dsn, "--check")
    assert healthy.exit_code == 0 and "ok: 1 pipelines healthy" in healthy.output, healthy.output
    assert status(dsn, "--check", "--stuck-after", "soon").exit_code != 0
