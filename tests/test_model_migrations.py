"""Model migrations of an alias (sql/model_migrations.sql, pgembed migrate …) with hash
models: the phases and their record, live changes during the backfill ending correct in
both pipelines, the scheduled cleanup, and every refusal one clear line that leaves the
alias and the pipelines as they were. The quality gate with the local model on SciFact is
tests/test_migration_quality.py."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from typer.testing import CliRunner

from pgembed import model_migrations as mm
from pgembed.cli import app
from pgembed.client import Client
from tests.conftest import drain
from tests.reliability.convergence import Expect, converge
from tests.test_scheduler import only, run_job

ROWS = 400


def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def notes(conn: psycopg.Connection, dsn: str) -> psycopg.Connection:
    """An alias `notes` on a hash:8 pipeline, embedded."""
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes SELECT i, 'note number ' || i FROM generate_series(1, %s::int) AS i", (ROWS,))
    conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:8', name => 'notes_old')")
    conn.execute("SELECT pgembed.set_alias('notes', 'notes_old')")
    drain(dsn)
    return conn


def alias_points_at(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT pipeline FROM pgembed.aliases WHERE name = 'notes'").fetchone()[0]


def pipelines(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM pgembed.pipelines ORDER BY name")]


def answers(dsn: str, target: str, text: str = "a short note on the number seven, 7") -> list[tuple[int, float]]:
    with Client(dsn) as client:
        found = [(h.key["id"], round(h.distance, 6)) for h in client.search(target, text, k=5)]
    assert found, target
    return found


def events(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT event FROM pgembed.model_migration_events ORDER BY id")]


def test_the_phases_by_command_and_their_record(notes: psycopg.Connection, dsn: str) -> None:
    conn = notes
    planned = cli("migrate", "plan", "notes", "--model", "hash:16", "--json", "--dsn", dsn)
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.stdout)
    assert plan["rows"] == ROWS and plan["cached_chunks"] == 0 and plan["tokens"] == 3 * ROWS
    assert pipelines(conn) == ["notes_old"]  # a dry run

    started = cli("migrate", "start", "notes", "--model", "hash:16", "--name", "notes_new", "--dsn", dsn)
    assert started.exit_code == 0, started.output
    assert "shadow pipeline notes_new" in started.output and f"{ROWS:,} rows queued" in started.output
    purposes = conn.execute("SELECT purpose, count(*) FROM pgembed.outbox GROUP BY 1").fetchall()
    assert purposes == [("migration", ROWS)]
    assert alias_points_at(conn) == "notes_old"

    drain(dsn)
    status = json.loads(cli("migrate", "status", "notes", "--json", "--dsn", dsn).stdout)
    [row] = status["migrations"]
    assert (row["phase"], row["rows"], row["done"], row["queued"]) == ("started", ROWS, ROWS, 0)
    assert row["tokens"] == row["estimated_tokens"] == 3 * ROWS  # spend so far against the estimate
    spent = conn.execute("SELECT sum(tokens) FROM pgembed.cost_daily WHERE purpose = 'migration'").fetchone()[0]
    assert spent == 3 * ROWS  # the cost views show the migration as its own purpose

    refused = cli("migrate", "cutover", "notes", "--dsn", dsn)
    assert refused.exit_code == 1 and "refused by the gate" in refused.output
    assert "no evaluation since the start" in refused.output
    forced = cli("migrate", "cutover", "notes", "--force", "--reason", "hash to hash, nothing to judge",
                 "--dsn", dsn)
    assert forced.exit_code == 0 and "cut over (forced)" in forced.output
    assert alias_points_at(conn) == "notes_new"
    assert answers(dsn, "notes") == answers(dsn, "notes_new") != answers(dsn, "notes_old")  # at once

    assert cli("migrate", "rollback", "notes", "--dsn", dsn).exit_code == 0
    assert alias_points_at(conn) == "notes_old"
    assert answers(dsn, "notes") == answers(dsn, "notes_old")
    cleaned = cli("migrate", "cleanup", "notes", "--dsn", dsn)
    assert cleaned.exit_code == 0 and "pipeline notes_new dropped" in cleaned.output
    assert pipelines(conn) == ["notes_old"] and alias_points_at(conn) == "notes_old"
    assert events(conn) == ["started", "cutover_refused", "cut_over", "rolled_back", "cleaned_up"]
    forced_by, reason = conn.execute(
        "SELECT by_user, detail ->> 'reason' FROM pgembed.model_migration_events WHERE event = 'cut_over'").fetchone()
    assert (forced_by, reason) == ("postgres", "hash to hash, nothing to judge")
    history = json.loads(cli("migrate", "status", "notes", "--json", "--dsn", dsn).stdout)
    assert history["migrations"][0]["phase"] == "cleaned_up" and len(history["events"]) == 5


def test_live_changes_during_the_backfill_end_correct_in_both(notes: psycopg.Connection, dsn: str) -> None:
    conn = notes
    mm.start(conn, "notes", "hash:16", name="notes_new")
    # rows the backfill has not reached yet: inserted, updated, deleted, and a row updated twice
    conn.execute("INSERT INTO notes SELECT i, 'late note ' || i FROM generate_series(%s::int, %s::int) AS i",
                 (ROWS + 1, ROWS + 50))
    conn.execute("UPDATE notes SET body = 'changed ' || id WHERE id % 10 = 0")
    conn.execute("UPDATE notes SET body = body || ' again' WHERE id % 20 = 0")
    conn.execute("DELETE FROM notes WHERE id % 7 = 0")
    drain(dsn)
    for pipeline in ("notes_old", "notes_new"):
        converge(conn, [Expect(pipeline, "notes", ["id"], ["id", "body"], lambda _id, body: body)])
    gate = conn.execute("SELECT pgembed.cutover_gate(m) FROM pgembed.model_migrations m").fetchone()[0]
    assert (gate["missing"], gate["stale"]) == (0, 0)


def test_the_gate_counts_rows_the_shadow_still_misses(notes: psycopg.Connection, dsn: str) -> None:
    conn = notes
    mm.start(conn, "notes", "hash:16", name="notes_new")
    verdict = mm.cutover(conn, "notes")
    assert not verdict["cut_over"] and verdict["missing"] == ROWS
    assert alias_points_at(conn) == "notes_old"
    assert conn.execute("SELECT phase FROM pgembed.model_migrations").fetchone()[0] == "started"


def test_the_scheduled_cleanup_waits_for_the_window(notes: psycopg.Connection, dsn: str) -> None:
    conn = notes
    mm.start(conn, "notes", "hash:16", name="notes_new", window=dt.timedelta(hours=1))
    drain(dsn)
    assert mm.cutover(conn, "notes", force=True, reason="test")["cut_over"]
    assert conn.execute("SELECT pgembed.cleanup_due_migrations()").fetchone()[0] == 0
    assert pipelines(conn) == ["notes_new", "notes_old"]
    conn.execute("UPDATE pgembed.model_migrations SET cut_over_at = now() - interval '61 minutes'")
    assert run_job(dsn, "cleanup", only(cleanup_every=3600)) is True  # the workers' periodic job
    detail = conn.execute("SELECT detail FROM pgembed.job_runs WHERE job = 'cleanup'").fetchone()[0]
    assert detail.endswith("1 finished model migrations cleaned up")
    assert pipelines(conn) == ["notes_new"] and alias_points_at(conn) == "notes_new"
    assert answers(dsn, "notes") == answers(dsn, "notes_new")


def test_refusals_are_one_clear_line_and_change_nothing(notes: psycopg.Connection, dsn: str) -> None:
    conn = notes

    def refused(args: tuple[str, ...], message: str) -> None:
        before = (alias_points_at(conn), pipelines(conn), events(conn))
        result = cli("migrate", *args, "--dsn", dsn)
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
        assert (alias_points_at(conn), pipelines(conn), events(conn)) == before

    refused(("plan", "nosuch", "--model", "hash:16"), "no alias named 'nosuch'")
    refused(("plan", "notes_old", "--model", "hash:16"), "'notes_old' is a pipeline, not an alias")
    refused(("plan", "notes", "--model", "nosuch:model"), 'unknown model "nosuch:model"')
    refused(("plan", "notes", "--model", "hash:8"), "alias 'notes' already uses hash:8")
    refused(("start", "notes", "--model", "hash:16", "--max-drop", "-1"), "max_drop must be 0 or more")
    refused(("cutover", "notes"), "alias 'notes' has no migration to cut over")
    refused(("rollback", "notes"), "alias 'notes' has no migration to roll back")

    mm.start(conn, "notes", "hash:16", name="notes_new")
    refused(("start", "notes", "--model", "hash:32"), "alias 'notes' has a migration in progress")
    refused(("rollback", "notes"), "it is not cut over yet")
    refused(("cutover", "notes", "--force"), "a forced cutover needs a reason")
    drain(dsn)
    mm.cutover(conn, "notes", force=True, reason="test")
    refused(("cutover", "notes"), "cannot cut over migration #1 of alias 'notes': it is cut over already")
    refused(("evaluate", "notes"), "is cut over: only a migration not yet cut over is evaluated")

    conn.execute("UPDATE pgembed.model_migrations SET cut_over_at = now() - interval '49 hours'")
    refused(("rollback", "notes"), "the rollback window of migration #1 of alias 'notes' ended at")
    conn.execute("UPDATE pgembed.model_migrations SET cut_over_at = now()")
    mm.cleanup(conn, "notes")
    refused(("rollback", "notes"), "cannot roll back migration #1 of alias 'notes': it is cleaned up")
    refused(("cleanup", "notes"), "it is cleaned up")
    assert pipelines(conn) == ["notes_new"]
    assert answers(dsn, "notes") == answers(dsn, "notes_new")


@pytest.mark.parametrize("window", ["0", "soon", "-5h"])
def test_a_bad_window_is_a_usage_error(notes: psycopg.Connection, dsn: str, window: str) -> None:
    result = cli("migrate", "start", "notes", "--model", "hash:16", "--window", window, "--dsn", dsn)
    assert result.exit_code == 2 and "--window must be a duration like 48h" in result.output
    assert pipelines(notes) == ["notes_old"] and events(notes) == []


def test_rollback_and_cleanup_in_json(notes: psycopg.Connection, dsn: str) -> None:
    mm.start(notes, "notes", "hash:16", name="notes_new")
    drain(dsn)
    assert json.loads(cli("migrate", "cutover", "notes", "--force", "--reason", "test", "--json", "--dsn",
                          dsn).stdout)["cut_over"] is True
    assert json.loads(cli("migrate", "rollback", "notes", "--json", "--dsn", dsn).stdout) == \
        {"migration": 1, "alias": "notes", "rolled_back": True}
    assert json.loads(cli("migrate", "cleanup", "notes", "--json", "--dsn", dsn).stdout) == \
        {"alias": "notes", "dropped": "notes_new"}


def test_a_new_migration_after_one_finished(notes: psycopg.Connection, dsn: str) -> None:
    conn = notes
    mm.start(conn, "notes", "hash:16", name="notes_new")
    mm.cleanup(conn, "notes")  # abandoned before cutover: the shadow goes
    assert pipelines(conn) == ["notes_old"]
    second, _ = mm.start(conn, "notes", "hash:32", name="notes_32")
    assert second == 2 and pipelines(conn) == ["notes_32", "notes_old"]


def test_the_reader_sees_the_migrations(notes: psycopg.Connection, dsn: str) -> None:
    conn = notes
    mm.start(conn, "notes", "hash:16", name="notes_new")
    role = f"watcher_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE pgembed_reader")
    try:
        with psycopg.connect(make_conninfo(dsn, user=role), autocommit=True) as reader:
            assert reader.execute("SELECT alias, phase, queued FROM pgembed.model_migration_status").fetchall() == \
                [("notes", "started", ROWS)]
            assert reader.execute("SELECT event FROM pgembed.model_migration_events").fetchall() == [("started",)]
    finally:
        conn.execute(f"DROP ROLE {role}")
