"""10. Secrets: the API key never reaches the database, the logs (at DEBUG), or the
errors the CLI prints, including when the API echoes a wrong key back."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from psycopg import sql

from tests.reliability.convergence import converge
from tests.reliability.harness import FORMS, ROOT, SECRET_KEY, api_pipeline, body_expect, make_docs, scalar

# what would give the key away: the whole of it, or its distinctive middle
NEEDLES = (SECRET_KEY, SECRET_KEY[8:24], SECRET_KEY[-12:])


def leaks(text: str) -> list[str]:
    return [n for n in NEEDLES if n in text]


def database_text(db) -> str:
    """Every row of every pgembed table and destination, the activity view and settings."""
    parts = []
    for schema, table in db.execute("SELECT schemaname, tablename FROM pg_tables WHERE schemaname = 'pgembed'"):
        rows = db.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(schema, table))).fetchall()
        parts.extend(r[0] for r in rows)
    parts.extend(str(r) for r in db.execute("SELECT * FROM pg_stat_activity"))
    parts.extend(str(r) for r in db.execute("SELECT name, setting FROM pg_settings"))
    return "\n".join(parts)


@pytest.mark.parametrize("form", FORMS)
def test_the_api_key_is_never_written_anywhere(form, dsn, db, api, fleet, results):
    rows = form.pick(60, 1_000)
    make_docs(db, "docs", rows)
    name = api_pipeline(db, "docs")
    db.execute("INSERT INTO docs VALUES (-1, 'a POISON text')")
    # the API rejects this key once (echoing it back, as OpenAI does), and one input
    api.api_key = "sk-the-right-key-is-another-one"
    api.always_reject("POISON", message=f"Invalid input; your key {SECRET_KEY} is logged here")
    first = fleet.start(until_empty=True, batch_size=16, max_attempts=1,
                        extra=["--log-level", "debug", "--no-scheduler"],
                        env={"PGEMBED_OPENAI_MAX_ATTEMPTS": "2"})
    # until the wrong key has been refused at least once (a loaded machine starts a worker
    # slowly: a fixed sleep could end before its first request)
    deadline = time.monotonic() + 60
    while not api.stats()["statuses"].get("401") and time.monotonic() < deadline:
        time.sleep(0.05)
    api.api_key = None
    first.wait(120)
    # the refused batches were put back for the outage backoff: age them instead of waiting
    db.execute("UPDATE pgembed.outbox SET available_at = now()")
    fleet.start(until_empty=True, batch_size=16, max_attempts=1,
                extra=["--log-level", "debug", "--no-scheduler"]).wait(120)
    report = converge(db, [body_expect(name, "docs", rejected=lambda t: "POISON" in t)], api=api,
                      bound=lambda ideal: ideal + 6 * 17 + rows)
    assert scalar(db, "SELECT count(*) FROM pgembed.failures") == 1
    logs = fleet.logs()
    assert "DEBUG" in logs, "the workers did log at DEBUG"
    assert "401" in logs or "Incorrect API key" in logs, "the wrong key was exercised"
    assert not leaks(logs), "the API key is in the worker logs"
    assert not leaks(database_text(db)), "the API key is in the database"
    # the CLI's own error path: a search whose query embedding the API refuses
    api.api_key = "sk-the-right-key-is-another-one"
    cli = subprocess.run([sys.executable, "-m", "pgembed", "search", name, "anything", "--dsn", dsn],
                         cwd=ROOT, env=fleet.env, capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0 and "error" in cli.stderr.lower(), cli.stderr
    assert "Traceback" not in cli.stderr
    assert not leaks(cli.stdout + cli.stderr), "the API key is in a CLI error"
    results.add("10 secrets", form.name, load=f"{rows} rows, 2 worker runs at DEBUG",
                faults="401 echoing the key, 400 echoing the key, CLI search refused",
                inputs="distinct text per row + 1 rejected", report=report,
                log_bytes=len(logs), leaks=0)
