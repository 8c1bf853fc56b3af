"""Evaluation sets and runs (issue 14): both file shapes import whole or not at all, with a
clear error for every bad input; a run searches through the path users get, stores its
metrics and the cost of its query embeddings; the history and regressions views show the
trend."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from pgembed import aliases, pipelines
from pgembed.client import Client
from pgembed.evaluation import runs, sets
from pgembed.evaluation.metrics import evaluate
from pgembed.evaluation.sets import EvalSetError
from pgembed.pipelines import PipelineError
from pgembed.scheduler import ScheduleConfig, Scheduler
from tests.conftest import drain
from tests.fakeapi import fake_token_count


@pytest.fixture
def docs(conn, dsn):
    """20 rows, a hash:16 pipeline (a query equal to a row's text finds that row first)
    behind the alias `articles`."""
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL)")
    conn.execute("INSERT INTO docs SELECT g, 'lighthouse ' || g FROM generate_series(1, 20) g")
    name = pipelines.create(conn, "docs", "body", "hash:16")
    drain(dsn)
    aliases.set_alias(conn, "articles", name)
    return name


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


GOOD = [{"id": "q1", "query": "lighthouse 7", "relevant": [7], "irrelevant": [8]},
        {"id": "q2", "query": "lighthouse 3", "relevant": ["3", {"id": 4}]},
        {"query": "lighthouse 12", "relevant": [15]}]


def counts(conn):
    return conn.execute("SELECT (SELECT count(*) FROM pgembed.eval_sets), (SELECT count(*) FROM pgembed.eval_queries), "
                        "(SELECT count(*) FROM pgembed.eval_judgments)").fetchone()


def test_jsonl_import_stores_queries_and_typed_keys(conn, docs, tmp_path):
    found = sets.read_jsonl(write_jsonl(tmp_path / "set.jsonl", GOOD))
    assert sets.import_set(conn, "smoke", "docs", found) == 3
    assert counts(conn) == (1, 3, 5)
    keys = conn.execute("SELECT query_id, key, relevance FROM pgembed.eval_judgments ORDER BY 1, 2").fetchall()
    assert keys == [("3", {"id": 15}, 1), ("q1", {"id": 7}, 1), ("q1", {"id": 8}, 0),
                    ("q2", {"id": 3}, 1), ("q2", {"id": 4}, 1)]  # "3" and 42-style keys alike, as search types them
    with pytest.raises(PipelineError, match="an evaluation set named 'smoke' exists already"):
        sets.import_set(conn, "smoke", "docs", found)
    assert sets.import_set(conn, "smoke", "docs", found, replace=True) == 3
    assert counts(conn) == (1, 3, 5)


@pytest.mark.parametrize(("lines", "message"), [
    ([{"query": "x"}], "set.jsonl:1: missing field 'relevant'"),
    ([{"relevant": [1]}], "set.jsonl:1: missing field 'query'"),
    ([{"query": "x", "relevant": [1], "relevent": [2]}], "unknown field\\(s\\) relevent"),
    ([{"id": "a", "query": "x", "relevant": [1]}, {"id": "a", "query": "y", "relevant": [2]}],
     r"set.jsonl:2: duplicate query id 'a'"),
    ([{"query": "x", "relevant": [1], "irrelevant": [1]}], "judges key 1 twice"),
    ([{"query": "x", "relevant": []}], "has no relevant key"),
    ([{"query": " ", "relevant": [1]}], "query must be a non-empty string"),
    ([{"query": "x", "relevant": 1}], "relevant must be a list of keys"),
    ([{"query": "x", "relevant": [None]}], "null is not a key"),
])
def test_bad_jsonl_is_refused_where_it_is_wrong(tmp_path, lines, message):
    with pytest.raises(EvalSetError, match=message):
        sets.read_jsonl(write_jsonl(tmp_path / "set.jsonl", lines))


def test_not_json_is_refused(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"query": "x", "relevant": [1]}\n{oops\n')
    with pytest.raises(EvalSetError, match=r"set\.jsonl:2: not JSON"):
        sets.read_jsonl(path)


def test_unknown_keys_are_all_reported_and_nothing_is_imported(conn, docs, tmp_path):
    lines = [*GOOD, {"query": "far", "relevant": [99, "abc", {"id": 5, "x": 1}]}]
    found = sets.read_jsonl(write_jsonl(tmp_path / "set.jsonl", lines))
    unknown = '3 judged key(s) name no row of public.docs: "abc", 99, {"x": 1, "id": 5}'
    with pytest.raises(PipelineError, match=re.escape(unknown)) as refused:
        sets.import_set(conn, "smoke", "docs", found)
    assert "nothing was imported" in str(refused.value)
    assert counts(conn) == (0, 0, 0)
    conn.execute("CREATE TABLE nokey (id int)")
    with pytest.raises(PipelineError, match=r"table public\.nokey has no primary key"):
        sets.import_set(conn, "smoke", "nokey", sets.read_jsonl(write_jsonl(tmp_path / "ok.jsonl", GOOD)))
    assert counts(conn) == (0, 0, 0)


def test_one_row_judged_twice_under_two_spellings_is_refused(conn, docs, tmp_path):
    found = sets.read_jsonl(write_jsonl(tmp_path / "set.jsonl", [{"query": "x", "relevant": [7, "7"]}]))
    with pytest.raises(PipelineError, match=r"judges row .*7.* more than once"):
        sets.import_set(conn, "smoke", "docs", found)
    assert counts(conn) == (0, 0, 0)


def write_beir(tmp_path, queries, qrels):
    q = write_jsonl(tmp_path / "queries.jsonl", queries)
    r = tmp_path / "qrels.tsv"
    r.write_text("".join("\t".join(map(str, row)) + "\n" for row in qrels))
    return q, r


def test_beir_import_keeps_the_judged_queries(conn, docs, tmp_path):
    q, r = write_beir(tmp_path, [{"_id": "1", "text": "lighthouse 7"}, {"_id": "2", "text": "lighthouse 9"},
                                 {"_id": "3", "text": "a test split query"}],
                      [("query-id", "corpus-id", "score"), ("1", "7", 1), ("1", "8", 0), ("2", "9", 2)])
    found = sets.read_beir(q, r)
    assert found.queries == {"1": "lighthouse 7", "2": "lighthouse 9"}
    assert sets.import_set(conn, "beir", "docs", found) == 2
    assert conn.execute("SELECT origin FROM pgembed.eval_sets").fetchone() == ("beir",)


@pytest.mark.parametrize(("queries", "qrels", "message"), [
    ([{"_id": "1"}], [("query-id", "corpus-id", "score")], "queries.jsonl:1: missing field 'text'"),
    ([{"_id": "1", "text": "a"}, {"_id": "1", "text": "b"}], [("query-id", "corpus-id", "score")],
     "queries.jsonl:2: duplicate query id '1'"),
    ([{"_id": "1", "text": "a"}], [("query", "doc", "score")], "qrels.tsv:1: missing column"),
    ([{"_id": "1", "text": "a"}], [("query-id", "corpus-id", "score"), ("2", "7", 1)],
     "qrels.tsv:2: query '2' is not in"),
    ([{"_id": "1", "text": "a"}], [("query-id", "corpus-id", "score"), ("1", "7", "high")],
     "qrels.tsv:2: score must be a whole number"),
    ([{"_id": "1", "text": "a"}], [("query-id", "corpus-id", "score"), ("1", "7", 1), ("1", "7", 2)],
     "qrels.tsv:3: query '1' judges key \"7\" twice"),
    ([{"_id": "1", "text": "a"}], [("query-id", "corpus-id", "score"), ("1", "7", 0)],
     "query '1' has no relevant row"),
])
def test_bad_beir_files_are_refused_where_they_are_wrong(tmp_path, queries, qrels, message):
    with pytest.raises(EvalSetError, match=message):
        sets.read_beir(*write_beir(tmp_path, queries, qrels))


def test_a_run_through_an_alias_is_stored_with_its_cost(conn, dsn, docs, tmp_path):
    sets.import_set(conn, "smoke", "docs", sets.read_jsonl(write_jsonl(tmp_path / "set.jsonl", GOOD)))
    run = runs.run_evaluation(conn, "articles", "smoke", ks=(1, 5))
    assert (run.target, run.pipeline, run.model, run.eval_set) == ("articles", docs, "hash:16", "smoke")
    assert set(run.metrics) == {"ndcg@10", "recall@1", "p@1", "mrr@1", "recall@5", "p@5", "mrr@5"}
    # the same ranking computed here, from pgembed.search straight, gives the same numbers
    from pgembed.search import search
    ranked = {q: [runs.key_id(h.key) for h in search(conn, docs, text, 10)]
              for q, text in conn.execute("SELECT query_id, query FROM pgembed.eval_queries")}
    qrels = {}
    for q, key, rel in conn.execute("SELECT query_id, key, relevance FROM pgembed.eval_judgments"):
        qrels.setdefault(q, {})[runs.key_id(key)] = rel
    assert run.metrics == pytest.approx(evaluate(qrels, ranked, (1, 5)))
    assert run.metrics["mrr@1"] == pytest.approx(2 / 3)  # q1 and q2 find a relevant row first, query 3 not
    stored = conn.execute("SELECT target, pipeline, queries, query_tokens, cost_center, ks FROM pgembed.eval_runs"
                          ).fetchone()
    tokens = conn.execute("SELECT sum(tokens) FROM pgembed.usage WHERE cost_center = 'eval:smoke' "
                          "AND purpose = 'query'").fetchone()[0]
    assert stored == ("articles", docs, 3, tokens, "eval:smoke", [1, 5])
    assert runs.latest_run(conn, docs, "smoke") == run
    assert runs.latest_run(conn, docs, "other") is None
    again = runs.run_evaluation(conn, docs, "smoke")  # by the pipeline's own name
    assert runs.latest_run(conn, docs, "smoke") == again
    with Client(dsn) as client:
        through_client = client.evaluate("articles", "smoke", ks=(1, 5))
    assert through_client.metrics == run.metrics and runs.latest_run(conn, docs, "smoke") == through_client


def test_a_run_records_what_its_query_embeddings_cost(conn, dsn, fake_api, tmp_path):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL)")
    conn.execute("INSERT INTO docs VALUES (1, 'stars at night'), (2, 'bread and butter')")
    name = pipelines.create(conn, "docs", "body", "openai:text-embedding-3-small")
    drain(dsn)
    lines = [{"query": "what shines at night", "relevant": [1]}, {"query": "breakfast", "relevant": [2]}]
    sets.import_set(conn, "smoke", "docs", sets.read_jsonl(write_jsonl(tmp_path / "set.jsonl", lines)))
    billed = fake_api.tokens
    first = runs.run_evaluation(conn, name, "smoke")
    second = runs.run_evaluation(conn, name, "smoke")  # the queries come from the cache now
    spent = conn.execute("SELECT id, query_tokens FROM pgembed.eval_runs ORDER BY id").fetchall()
    assert spent == [(first.id, fake_api.tokens - billed), (second.id, 0)]
    assert fake_api.tokens - billed == fake_token_count("what shines at night") + fake_token_count("breakfast")
    assert conn.execute("SELECT sum(tokens) FROM pgembed.cost_by_cost_center WHERE purpose = 'query' "
                        "AND cost_center = 'eval:smoke'").fetchone() == (fake_api.tokens - billed,)
    usd = conn.execute("SELECT sum(usd) FROM pgembed.cost_by_cost_center WHERE purpose = 'query' "
                       "AND cost_center = 'eval:smoke'").fetchone()[0]
    assert conn.execute("SELECT sum(query_usd) FROM pgembed.eval_history").fetchone() == (usd,) and usd > 0


def test_a_run_of_an_unknown_set_or_target_is_refused(conn, docs):
    with pytest.raises(PipelineError, match="no evaluation set named 'nope'"):
        runs.run_evaluation(conn, "articles", "nope")
    with pytest.raises(PipelineError, match="no pipeline or alias named 'nope'"):
        runs.run_evaluation(conn, "nope", "smoke")
    with pytest.raises(ValueError, match="every k must be 1 or more"):
        runs.run_evaluation(conn, "articles", "smoke", ks=(0,))
    assert conn.execute("SELECT count(*) FROM pgembed.eval_runs").fetchone() == (0,)


def test_history_shows_the_trend_and_regressions_the_drops(conn, dsn, docs, tmp_path):
    sets.import_set(conn, "smoke", "docs", sets.read_jsonl(write_jsonl(tmp_path / "set.jsonl", GOOD)))
    first = runs.run_evaluation(conn, "articles", "smoke")
    conn.execute("DELETE FROM docs WHERE id = 7")  # q1's relevant row is gone from the index
    drain(dsn)
    second = runs.run_evaluation(conn, "articles", "smoke")
    assert second.metrics["ndcg@10"] < first.metrics["ndcg@10"] - 0.02
    history = conn.execute("SELECT id, ndcg_10, ndcg_10_change FROM pgembed.eval_history ORDER BY id").fetchall()
    assert history == [(first.id, pytest.approx(first.metrics["ndcg@10"]), None),
                       (second.id, pytest.approx(second.metrics["ndcg@10"]),
                        pytest.approx(second.metrics["ndcg@10"] - first.metrics["ndcg@10"]))]
    assert conn.execute("SELECT id, threshold FROM pgembed.eval_regressions").fetchall() == [(second.id, 0.02)]
    aliases.set_evaluation(conn, "articles", "smoke", threshold=0.9)  # a drop smaller than that is no regression
    assert conn.execute("SELECT count(*) FROM pgembed.eval_regressions").fetchone() == (0,)


def test_the_scheduler_re_runs_an_alias_s_set_when_it_is_due(conn, dsn, docs, tmp_path):
    sets.import_set(conn, "smoke", "docs", sets.read_jsonl(write_jsonl(tmp_path / "set.jsonl", GOOD)))
    aliases.set_alias(conn, "unwatched", docs)  # no set attached: never run
    aliases.set_evaluation(conn, "articles", "smoke")  # weekly, the default
    config = ScheduleConfig(audit_every=None, cleanup_every=None, retry_every=None, index_every=None,
                            eval_every=3600)
    assert asyncio.run(Scheduler(dsn, "w1", config).run_job("evaluation")) is True
    assert conn.execute("SELECT target, eval_set, scheduled FROM pgembed.eval_runs").fetchall() == [
        ("articles", "smoke", True)]
    assert conn.execute("SELECT ok, detail FROM pgembed.job_runs WHERE job = 'evaluation'").fetchone() == (
        True, f"articles on smoke: nDCG@10 {runs.latest_run(conn, docs, 'smoke').metrics['ndcg@10']:.4f}")
    assert runs.evaluate_due(conn) == "no evaluation due"  # within the week
    conn.execute("UPDATE pgembed.eval_runs SET at = at - interval '8 days'")
    assert runs.evaluate_due(conn).startswith("articles on smoke")
    aliases.set_evaluation(conn, "articles", "smoke", every=None)  # never
    conn.execute("UPDATE pgembed.eval_runs SET at = at - interval '8 days'")
    assert runs.evaluate_due(conn) == "no evaluation due"
    assert conn.execute("SELECT count(*) FROM pgembed.eval_runs WHERE scheduled").fetchone() == (2,)
