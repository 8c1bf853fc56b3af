"""`pgembed alias` and `pgembed eval` (issue 14): every verb end to end at 80 columns and
with --json, bad input as one line with exit code 2 and nothing written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pgembed import pipelines
from pgembed.cli import app, out
from tests.conftest import drain

runner = CliRunner()
WIDTH = 80


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setattr(out, "width", WIDTH)


def cli(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    assert all(len(line) <= WIDTH for line in result.stdout.splitlines()), result.stdout
    return result


@pytest.fixture
def docs(conn, dsn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL)")
    conn.execute("INSERT INTO docs SELECT g, 'lighthouse ' || g FROM generate_series(1, 20) g")
    old = pipelines.create(conn, "docs", "body", "hash:16")
    new = pipelines.create(conn, "docs", "body", "hash:8")
    drain(dsn)
    return old, new


def test_alias_set_list_drop(conn, dsn, docs, narrow):
    old, new = docs
    assert cli("alias", "list", "--dsn", dsn).stdout.startswith("no aliases; make one with pgembed alias set")
    made = cli("alias", "set", "articles", old, "--dsn", dsn)
    assert made.exit_code == 0 and made.stdout.strip() == f"articles -> {old}"
    moved = cli("alias", "set", "articles", new, "--json", "--dsn", dsn)
    assert moved.exit_code == 0 and json.loads(moved.stdout)["previous"] == old
    listed = cli("alias", "list", "--dsn", dsn)
    assert "articles" in listed.stdout and new in listed.stdout
    assert [a["name"] for a in json.loads(cli("alias", "list", "--json", "--dsn", dsn).stdout)] == ["articles"]
    assert cli("alias", "drop", "articles", "--dsn", dsn).stdout.strip() == "alias articles dropped"
    assert conn.execute("SELECT count(*) FROM pgembed.aliases").fetchone() == (0,)


@pytest.mark.parametrize(("args", "message"), [
    (("alias", "set", "docs_h8", "docs_h16"), "'docs_h8' is the name of a pipeline"),
    (("alias", "set", "articles", "nope"), "no pipeline named 'nope'"),
    (("alias", "set", "articles", "docs_h16", "--eval-set", "nope"), "no evaluation set named 'nope'"),
    (("alias", "set", "articles", "docs_h16", "--every", "often"), "not a duration"),
    (("alias", "drop", "nope"), "no alias named 'nope'"),
    (("eval", "import", "s", "--source", "docs"), "give --jsonl FILE, or --queries FILE and --qrels FILE"),
    (("eval", "run", "nope", "--set", "s"), "no pipeline or alias named 'nope'"),
    (("eval", "run", "docs_h8", "--set", "nope"), "no evaluation set named 'nope'"),
    (("eval", "drop", "nope"), "no evaluation set named 'nope'"),
])
def test_bad_input_is_one_line_with_exit_code_2(conn, dsn, docs, args, message):
    result = cli(*args, "--dsn", dsn)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in " ".join(result.output.split()), result.output
    assert conn.execute("SELECT (SELECT count(*) FROM pgembed.aliases) + (SELECT count(*) FROM pgembed.eval_sets)"
                        ).fetchone() == (0,)


def test_eval_import_run_history_regressions(conn, dsn, docs, narrow, tmp_path):
    old = docs[0]
    lines = [{"id": "q1", "query": "lighthouse 7", "relevant": [7]}, {"id": "q2", "query": "lighthouse 3",
                                                                      "relevant": [3], "irrelevant": [4]}]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "x", "relevant": [99]}) + "\n")
    refused = cli("eval", "import", "smoke", "--source", "docs", "--jsonl", str(bad), "--dsn", dsn)
    assert refused.exit_code == 2 and "1 judged key(s) name no row of public.docs: 99" in refused.output
    imported = cli("eval", "import", "smoke", "--source", "docs", "--jsonl", str(path), "--dsn", dsn)
    assert imported.exit_code == 0, imported.output
    assert imported.stdout.strip() == "evaluation set smoke: 2 queries, 3 judged rows of docs"
    assert "smoke" in cli("eval", "sets", "--dsn", dsn).stdout
    assert cli("alias", "set", "articles", old, "--eval-set", "smoke", "--dsn", dsn).exit_code == 0
    ran = cli("eval", "run", "articles", "--set", "smoke", "--dsn", dsn)
    assert ran.exit_code == 0 and ran.stdout.startswith(f"smoke on {old} through articles (hash:16): nDCG@10 1.0000")
    assert "Recall@k" in ran.stdout
    as_json = json.loads(cli("eval", "run", "articles", "--set", "smoke", "-k", "1", "--json", "--dsn", dsn).stdout)
    assert as_json["pipeline"] == old and set(as_json["metrics"]) == {"ndcg@10", "recall@1", "p@1", "mrr@1"}
    conn.execute("DELETE FROM docs WHERE id = 7")
    drain(dsn)
    worse = json.loads(cli("eval", "run", "articles", "--set", "smoke", "--json", "--dsn", dsn).stdout)
    history = cli("eval", "history", "articles", "--dsn", dsn)
    assert history.exit_code == 0 and history.stdout.count("articles") == 3, history.stdout
    rows = json.loads(cli("eval", "history", "--set", "smoke", "--json", "--dsn", dsn).stdout)
    assert [r["id"] for r in rows][-1] == worse["id"] and rows[-1]["ndcg_10_change"] < 0
    regressions = json.loads(cli("eval", "regressions", "--json", "--dsn", dsn).stdout)
    assert [r["id"] for r in regressions] == [worse["id"]]
    assert "articles" in cli("eval", "regressions", "--dsn", dsn).stdout
    assert cli("eval", "drop", "smoke", "--dsn", dsn).exit_code == 0
    assert cli("eval", "history", "--dsn", dsn).stdout.startswith("no evaluation runs yet")
