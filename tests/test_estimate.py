"""The dry run of a backfill: what it says before anything is paid is what the worker then
records in pgembed.usage, with the local model's own tokenizer; texts the cache holds are
free. Bad input is refused as create_pipeline refuses it, and creates nothing."""

from __future__ import annotations

import psycopg
import pytest
from typer.testing import CliRunner

from pgembed import estimate
from pgembed.cli import app
from pgembed.pipelines import PipelineOptions
from pgembed.tokens import count_tokens
from tests.conftest import drain

MINILM = "local:all-MiniLM-L6-v2"
PRICE = 0.5  # usd per million tokens, so that spend is not 0 = 0


def body(i: int, rows: int) -> str:
    """Short rows, every 250th long enough to be cut into chunks, the last fifth repeating
    earlier texts (paid for once)."""
    n = i - rows // 5 if i > rows - rows // 5 else i
    words = " ".join(f"w{(n * 7 + j) % 911}" for j in range(600 if n % 250 == 0 else 8 + n % 13))
    return f"row {n}: {words}"


@pytest.mark.parametrize(("model", "rows"), [
    ("hash:384", 5000),
    pytest.param(MINILM, 1000, marks=pytest.mark.local_model),  # its own tokenizer; 4 times slower a row
])
def test_the_dry_run_matches_what_the_backfill_records(conn: psycopg.Connection, dsn: str, model: str,
                                                       rows: int) -> None:
    conn.execute("INSERT INTO pgembed.models (model, dimensions, short_name) VALUES ('hash:384', 384, 'h384') "
                 "ON CONFLICT DO NOTHING")  # a row of its own, to carry a price
    conn.execute("UPDATE pgembed.models SET usd_per_1m_tokens = %s WHERE model = %s", (PRICE, model))
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    with conn.cursor().copy("COPY docs (id, body) FROM STDIN") as copy:
        for i in range(1, rows + 1):
            copy.write_row((i, body(i, rows)))
    conn.execute("INSERT INTO docs VALUES (%s, NULL), (%s, '   ')", (rows + 1, rows + 2))  # nothing to embed
    # the cache holds the first fifth already (another table's pipeline paid for them)
    cached = rows // 5
    conn.execute("CREATE TABLE seen (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO seen SELECT id, body FROM docs WHERE id <= %s", (cached,))
    conn.execute("SELECT pgembed.create_pipeline('seen', 'body', %s)", (model,))
    drain(dsn)
    conn.execute("DELETE FROM pgembed.usage")

    planned = estimate.estimate(conn, estimate.backfill_target(conn, "docs", "body", model, PipelineOptions()))
    assert (planned.rows, planned.empty_rows) == (rows + 2, 2)
    assert planned.cached_rows == cached
    assert planned.chunks > rows  # the long rows are several chunks each
    assert planned.seconds is None  # no rate budget for a model that calls no API
    assert conn.execute("SELECT count(*) FROM pgembed.pipelines").fetchone()[0] == 1  # nothing created

    name = conn.execute("SELECT pgembed.create_pipeline('docs', 'body', %s)", (model,)).fetchone()[0]
    assert drain(dsn).failed == 0
    tokens, usd, hits, misses = conn.execute(
        "SELECT sum(tokens), sum(usd), sum(cache_hits), sum(cache_misses) FROM pgembed.usage_cost "
        "WHERE pipeline = %s AND purpose = 'backfill'", (name,)).fetchone()
    assert tokens == pytest.approx(planned.tokens, rel=0.02)
    assert float(usd) == pytest.approx(float(planned.usd), rel=0.02)
    assert misses == pytest.approx(planned.chunks - planned.cached_chunks, rel=0.02)
    assert hits + misses == planned.chunks


def test_the_dry_run_of_a_priced_api_model_gives_spend_and_time(conn: psycopg.Connection, fake_api) -> None:
    from pgembed.ratelimit import Budget, set_openai_budget

    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes SELECT i, repeat('word ', 100) || i FROM generate_series(1, 300) AS i")
    set_openai_budget(conn, Budget.per_minute(rpm=None, tpm=10_000))
    planned = estimate.estimate(conn, estimate.backfill_target(conn, "notes", "body", "openai:text-embedding-3-small",
                                                               PipelineOptions()))
    assert planned.rows == 300 and planned.cached_chunks == 0
    texts = [("word " * 100) + str(i) for i in range(1, 301)]
    assert planned.tokens == sum(count_tokens(t) for t in texts)  # cl100k, as OpenAI bills
    assert float(planned.usd) == pytest.approx(planned.tokens * 0.02 / 1e6)
    assert planned.seconds == pytest.approx(planned.tokens / 10_000 * 60)
    assert fake_api.requests == 0  # nothing was sent


@pytest.mark.parametrize(("args", "message"), [
    (("nosuch", "body", "hash:8"), 'relation "nosuch" does not exist'),
    (("notes", "nosuch_column", "hash:8"), "nosuch_column"),
    (("notes", "body", "nosuch:model"), 'unknown model "nosuch:model"'),
])
def test_a_bad_dry_run_is_one_clear_line_and_creates_nothing(conn: psycopg.Connection, dsn: str,
                                                             args: tuple[str, str, str], message: str) -> None:
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    table, content, model = args
    result = CliRunner().invoke(app, ["pipeline", "create", table, content, "--model", model, "--dry-run",
                                      "--dsn", dsn])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert conn.execute("SELECT count(*) FROM pgembed.pipelines").fetchone()[0] == 0


def test_the_dry_run_command_prints_the_estimate(conn: psycopg.Connection, dsn: str) -> None:
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes SELECT i, 'one two three' FROM generate_series(1, 40) AS i")
    result = CliRunner().invoke(app, ["pipeline", "create", "notes", "body", "--model", "hash:8", "--dry-run",
                                      "--dsn", dsn])
    assert result.exit_code == 0, result.output
    assert "dry run, nothing created" in result.output and "no rate budget" in result.output
    assert conn.execute("SELECT count(*) FROM pgembed.pipelines").fetchone()[0] == 0
