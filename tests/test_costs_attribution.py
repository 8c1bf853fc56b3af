"""Cost by source, user and task (acceptance 4 of issue 15): from usage the tests produce
(a worker draining through the fake API, attributed searches, rows dated in the past for
history), the views answer the three questions: what share of each day is indexing versus
queries, which users and tasks spent most, and which reindex consumes unusual budget."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from pgembed import costs, pipelines
from pgembed.attribution import Attribution
from pgembed.search import search
from tests.conftest import drain
from tests.fakeapi import fake_token_count
from tests.test_costs import cli, wide  # noqa: F401 (wide: a fixture)

MODEL = "openai:text-embedding-3-small"  # $0.02 / 1M tokens
PRICE = Decimal("0.02") / 1_000_000

def past_usage(conn, days_ago: int, purpose: str, tokens: int, *, source: str | None = None,
               user: str | None = None, task: str | None = None, price_factor: float = 1,
               pipeline: str | None = None) -> None:
    """A usage row as the worker, a search or the gateway wrote it `days_ago` days ago
    (0: now)."""
    conn.execute("INSERT INTO pgembed.usage (at, pipeline, model, purpose, requests, inputs, tokens, "
                 "cache_misses, source, app_user, task, price_factor) VALUES ("
                 "CASE WHEN %(d)s = 0 THEN now() ELSE current_date - %(d)s + time '12:00' END, "
                 "%(p)s, %(m)s, %(u)s, 1, 1, %(t)s, 1, %(s)s, %(au)s, %(task)s, %(f)s)",
                 {"d": days_ago, "p": pipeline, "m": MODEL, "u": purpose, "t": tokens, "s": source,
                  "au": user, "task": task, "f": price_factor})


def notes(conn) -> str:
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes SELECT g, 'note number ' || g || ' about the garden' "
                 "FROM generate_series(1, 30) g")
    return pipelines.create(conn, "notes", "body", MODEL, pipelines.PipelineOptions(dimensions=64))


QUERIES = [  # (user, task, text): alice asks the most, in the most words
    ("alice", "ask", "which plants need the most water in a dry summer garden"),
    ("alice", "ask", "how deep should tomato seeds be planted in spring"),
    ("alice", "summarize", "summarize every note about roses and their pruning schedule"),
    ("bob", "ask", "mulch"),
    ("carol", "summarize", "what grows in shade"),
]


def attributed_searches(conn, name: str) -> None:
    for user, task, text in QUERIES:
        assert search(conn, name, text, 3, attribution=Attribution(source="user_query", user=user, task=task))
    # the same text again: answered by the cache, recorded, billed nothing
    search(conn, name, QUERIES[3][2], 3, attribution=Attribution(source="user_query", user="bob", task="ask"))


def test_each_day_splits_into_indexing_and_queries_that_add_up_to_what_the_api_billed(conn, dsn, fake_api):
    name = notes(conn)
    drain(dsn, batch_size=10)
    indexed = fake_api.tokens
    attributed_searches(conn, name)
    queried = sum(fake_token_count(text) for _, _, text in QUERIES)
    assert fake_api.tokens == indexed + queried
    # history: two days ago, the gateway embedded documents (index) and a batch went at half price
    past_usage(conn, 2, "index", 3000, source="note_index")
    past_usage(conn, 2, "backfill", 2000, price_factor=0.5)
    past_usage(conn, 2, "query", 1000, source="user_query", user="alice")

    share = {(str(r["day"]), r["work"]): r for r in costs.share(conn, 7)}
    today, before = (conn.execute("SELECT current_date::text, (current_date - 2)::text").fetchone())
    assert set(share) == {(today, "indexing"), (today, "query"), (before, "indexing"), (before, "query")}
    assert share[today, "indexing"]["tokens"] == indexed
    assert share[today, "query"]["tokens"] == queried
    assert share[today, "indexing"]["tokens"] + share[today, "query"]["tokens"] == fake_api.tokens
    assert share[today, "query"]["usd"] == queried * PRICE
    assert share[today, "query"]["token_share"] == round(Decimal(queried) / fake_api.tokens, 4)
    assert share[today, "indexing"]["usd_share"] + share[today, "query"]["usd_share"] == pytest.approx(1, abs=1e-4)
    # two days ago: 5000 tokens of indexing, of which 2000 at half price, against 1000 of queries
    assert share[before, "indexing"]["tokens"] == 5000 and share[before, "query"]["tokens"] == 1000
    assert share[before, "indexing"]["usd"] == 4000 * PRICE
    assert share[before, "query"]["usd_share"] == round(Decimal(1000) / 5000, 4)
    assert share[before, "indexing"]["token_share"] == round(Decimal(5000) / 6000, 4)
    assert len(costs.share(conn, 1)) == 2, "--days 1 is today only"


def test_a_worker_batch_is_labelled_with_its_purpose_and_an_attributed_search_with_its_labels(conn, dsn, fake_api):
    name = notes(conn)
    drain(dsn, batch_size=10)
    attributed_searches(conn, name)
    search(conn, name, "nobody said who asked", 1)
    sources = dict(conn.execute("SELECT source, sum(tokens) FROM pgembed.usage_cost GROUP BY 1").fetchall())
    assert set(sources) == {"backfill", "user_query", "query"}
    assert sources["query"] == fake_token_count("nobody said who asked")
    assert conn.execute("SELECT count(*) FROM pgembed.usage WHERE source IS NULL").fetchone()[0] > 0, \
        "the ledger keeps NULL: the label is the view's"
    works = set(conn.execute("SELECT purpose, work FROM pgembed.usage_cost").fetchall())
    assert works == {("backfill", "indexing"), ("query", "query")}


@pytest.mark.usefixtures("wide")
def test_the_top_users_and_tasks_of_a_period_and_of_each_day(conn, dsn, fake_api):
    name = notes(conn)
    drain(dsn, batch_size=10)
    attributed_searches(conn, name)
    # yesterday bob spent the most; three days ago carol; ten days ago (outside 7 days) dave
    past_usage(conn, 1, "query", 5000, source="user_query", user="bob", task="ask")
    past_usage(conn, 1, "query", 10, source="user_query", user="alice", task="ask")
    past_usage(conn, 3, "query", 900, source="user_query", user="carol", task="summarize")
    past_usage(conn, 10, "query", 90000, source="user_query", user="dave", task="export")

    spent = {u: sum(fake_token_count(t) for who, _, t in QUERIES if who == u) for u in ("alice", "bob", "carol")}
    today = conn.execute("SELECT app_user, tokens, usd, rank_in_day FROM pgembed.cost_by_user "
                         "WHERE day = current_date AND app_user IS NOT NULL ORDER BY rank_in_day").fetchall()
    assert [(u, t) for u, t, _, _ in today] == [("alice", spent["alice"]), ("carol", spent["carol"]),
                                                 ("bob", spent["bob"])]
    # rank 1 is the backfill's NULL user: the worker names nobody
    assert [r for *_, r in today] == [2, 3, 4] and today[0][2] == spent["alice"] * PRICE
    yesterday = conn.execute("SELECT app_user FROM pgembed.cost_by_user "
                             "WHERE day = current_date - 1 AND rank_in_day = 1").fetchone()
    assert yesterday == ("bob",)

    week = costs.spend(conn, 7, "user", top=2)
    assert [(r["label"], r["tokens"]) for r in week] == [("bob", 5000 + spent["bob"]), ("carol", 900 + spent["carol"])]
    month = costs.spend(conn, 30, "user", top=1)
    assert [r["label"] for r in month] == ["dave"]
    tasks = {r["label"]: r["tokens"] for r in costs.spend(conn, 7, "task")}
    ask = sum(fake_token_count(t) for _, task, t in QUERIES if task == "ask")
    assert tasks["ask"] == ask + 5010 and tasks["summarize"] == spent["carol"] + 900 + fake_token_count(QUERIES[2][2])
    assert tasks[None] == fake_api.tokens - sum(fake_token_count(t) for *_, t in QUERIES), "the worker's batches"
    by_task_today = conn.execute("SELECT task FROM pgembed.cost_by_task WHERE day = current_date "
                                 "AND rank_in_day = 1").fetchone()
    assert by_task_today == (None,), "today the backfill, which names no task, spent the most"

    shown = cli("costs", "--by", "user", "--top", "2", "--dsn", dsn)
    assert shown.exit_code == 0, shown.output
    assert "by user" in shown.output and "bob" in shown.output and "carol" in shown.output
    assert "alice" not in shown.output and "dave" not in shown.output
    as_json = json.loads(cli("costs", "--by", "task", "--json", "--dsn", dsn).output)
    assert {r["label"]: r["tokens"] for r in as_json["spend"]} == tasks
    assert cli("costs", "--by", "purpose", "--top", "2", "--dsn", dsn).exit_code == 2, "--top ranks labels"
    assert cli("costs", "--by", "user", "--top", "0", "--dsn", dsn).exit_code == 2


def test_price_factor_halves_a_batch_rows_spend(conn):
    past_usage(conn, 0, "backfill", 1_000_000, source="reindex")
    past_usage(conn, 0, "backfill", 1_000_000, source="reindex", price_factor=0.5)
    spends = sorted(r[0] for r in conn.execute("SELECT usd FROM pgembed.usage_cost").fetchall())
    assert spends == [Decimal("0.01"), Decimal("0.02")]
    assert conn.execute("SELECT sum(usd) FROM pgembed.cost_daily").fetchone()[0] == Decimal("0.03")
    # a DBA's price edit re-prices both, the factor kept
    conn.execute("UPDATE pgembed.models SET usd_per_1m_tokens = 0.13 WHERE model = %s", (MODEL,))
    assert conn.execute("SELECT sum(usd) FROM pgembed.cost_share_daily").fetchone()[0] == Decimal("0.195")


@pytest.mark.usefixtures("wide")
def test_a_reindex_far_above_its_usual_is_flagged_by_source_and_task(conn, dsn, fake_api):
    for day in range(1, 8):  # a week of ordinary traffic, $0.20 a day each
        past_usage(conn, day, "index", 10_000_000, source="note_index", task="save")
        past_usage(conn, day, "index", 10_000_000, source="reindex", task="nightly")
        past_usage(conn, day, "query", 10_000_000, source="user_query", task="ask")
    past_usage(conn, 0, "index", 11_000_000, source="note_index", task="save")  # an ordinary day
    past_usage(conn, 0, "query", 12_000_000, source="user_query", task="ask")
    past_usage(conn, 0, "index", 900_000_000, source="reindex", task="nightly")  # $18: 90× its usual
    # a model migration's backfill: the worker's, named by its purpose, no history
    past_usage(conn, 0, "migration", 100_000_000, pipeline="notes_te3s_64")

    found = {(r["source"], r["task"]): r for r in costs.source_anomalies(conn)}
    assert set(found) == {("reindex", "nightly"), ("migration", None)}
    reindex = found["reindex", "nightly"]
    assert (reindex["measure"], reindex["today"], reindex["ratio"]) == ("usd", Decimal(18), Decimal(90))
    assert found["migration", None]["ratio"] is None, "no history: flagged, ratio unknown"
    # the same traffic by pipeline and purpose hides the reindex inside the day's index spend
    by_pipeline = {(r[0], r[1]) for r in conn.execute("SELECT pipeline, purpose FROM pgembed.cost_anomalies")}
    assert ("notes_te3s_64", "migration") in by_pipeline
    stricter = conn.execute("SELECT source FROM pgembed.find_source_anomalies(p_ratio => 100)").fetchall()
    assert stricter == [("migration",)]

    shown = cli("costs", "--dsn", dsn)
    assert shown.exit_code == 0, shown.output
    assert "spend by source far above" in shown.output and "nightly" in shown.output
    assert json.loads(cli("costs", "--json", "--dsn", dsn).output)["source_anomalies"][0]["source"] == "reindex"


@pytest.mark.usefixtures("wide")
def test_the_share_command_prints_each_day(conn, dsn, fake_api):
    name = notes(conn)
    drain(dsn, batch_size=10)
    attributed_searches(conn, name)
    shown = cli("costs", "--share", "--dsn", dsn)
    assert shown.exit_code == 0, shown.output
    assert "indexing vs queries, last 7 days" in shown.output
    assert "indexing" in shown.output and "query" in shown.output and "%" in shown.output
    rows = json.loads(cli("costs", "--share", "--days", "1", "--json", "--dsn", dsn).output)["share"]
    assert sum(r["tokens"] for r in rows) == fake_api.tokens
    assert {r["work"] for r in rows} == {"indexing", "query"}


def test_the_readmes_cost_queries_run_as_written(conn, dsn, fake_api):
    name = notes(conn)
    drain(dsn, batch_size=10)
    attributed_searches(conn, name)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Cost by source, user and task", 1)[1]
    block = section.split("```sql", 1)[1].split("```", 1)[0]
    answers = [conn.execute(statement).fetchall() for statement in block.split(";") if "SELECT" in statement]
    assert len(answers) == 4
    share, users, tasks, anomalies = answers
    assert {w for _, w, *_ in share} == {"indexing", "query"}
    assert users[0][0] is None and {u for u, *_ in users[1:]} == {"alice", "bob", "carol"}
    assert tasks and anomalies == []
