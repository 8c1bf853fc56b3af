"""A pipeline whose provider cannot work (no API key, a local model that cannot load) is
found before anything is claimed for it, reported in one sentence, and skipped: the other
pipelines are served, and a drain then ends non-zero, saying which pipeline it could not
serve. Nothing is left leased, so the next run, fixed, embeds every row."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from pgembed import pipelines
from pgembed.cli import app
from pgembed.worker import Unfinished
from tests.conftest import drain

runner = CliRunner()
OPENAI = "openai:text-embedding-3-small"
SMALL = pipelines.PipelineOptions(dimensions=64)


@pytest.fixture(autouse=True)
def _root_handlers() -> Iterator[None]:
    """`pgembed worker` installs a log handler on the runner's stream, closed afterwards (an
    earlier test's would write to a closed stream here)."""
    root = logging.getLogger()
    saved = list(root.handlers)
    root.handlers[:] = []
    yield
    root.handlers[:] = saved


def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGEMBED_OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def _leased(conn) -> int:
    return conn.execute("SELECT count(*) FROM pgembed.outbox WHERE lease_id IS NOT NULL").fetchone()[0]


def _two_pipelines(conn) -> tuple[str, str]:
    for table in ("a", "b"):
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
        conn.execute(f"INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, 50) g")
    return (pipelines.create(conn, "a", "body", "hash:16"), pipelines.create(conn, "b", "body", OPENAI, SMALL))


def test_no_api_key_skips_that_pipeline_serves_the_others_and_leases_nothing(conn, dsn, fake_api, monkeypatch):
    hashed, api = _two_pipelines(conn)
    _no_key(monkeypatch)
    with pytest.raises(Unfinished) as raised:
        drain(dsn, batch_size=10)
    message = str(raised.value)
    assert f"pipeline {api} could not be served (50 rows left queued)" in message and "no API key" in message
    assert raised.value.stats.written == 50
    assert conn.execute(f"SELECT count(*) FROM pgembed.{hashed}").fetchone()[0] == 50
    assert _leased(conn) == 0 and fake_api.requests == 0

    result = runner.invoke(app, ["worker", "--until-empty", "--dsn", dsn])
    assert result.exit_code == 1
    assert f"pipeline {api} could not be served" in result.output and "no API key" in result.output
    assert "Traceback" not in result.output and _leased(conn) == 0

    monkeypatch.setenv("PGEMBED_OPENAI_API_KEY", "sk-test-not-a-real-key")
    result = runner.invoke(app, ["worker", "--until-empty", "--dsn", dsn])
    assert result.exit_code == 0, result.output
    assert "50 rows embedded" in result.output
    assert conn.execute(f"SELECT count(*) FROM pgembed.{api}").fetchone()[0] == 50


def test_a_local_model_that_cannot_load_is_found_before_anything_is_claimed(conn, dsn):
    conn.execute("INSERT INTO pgembed.models (model, dimensions, short_name, usd_per_1m_tokens) "
                 "VALUES ('local:/nonexistent/model', 8, 'nx', 0)")
    conn.execute("CREATE TABLE c (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO c SELECT g, 'row ' || g FROM generate_series(1, 20) g")
    name = pipelines.create(conn, "c", "body", "local:/nonexistent/model")
    with pytest.raises(Unfinished, match=r"could not be served \(20 rows left queued\).*does not exist"):
        drain(dsn)
    assert _leased(conn) == 0
    assert conn.execute("SELECT count(*) FROM pgembed.failures").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pgembed.outbox WHERE pipeline = %s", (name,)).fetchone()[0] == 20


def test_quickstart_without_a_key_then_with_one_embeds_every_row(conn, dsn, fake_api, monkeypatch):
    _no_key(monkeypatch)
    first = runner.invoke(app, ["quickstart", "--model", OPENAI, "--dsn", dsn])
    assert first.exit_code == 1
    assert "no API key" in first.output and "Traceback" not in first.output
    assert _leased(conn) == 0
    monkeypatch.setenv("PGEMBED_OPENAI_API_KEY", "sk-test-not-a-real-key")
    second = runner.invoke(app, ["quickstart", "--model", OPENAI, "--dsn", dsn])
    assert second.exit_code == 0, second.output
    assert "audit: 0 rows missing" in second.output
    assert conn.execute("SELECT count(*) FROM pgembed.pgembed_sample_articles_te3s").fetchone()[0] == 36
