"""Cost attribution: pgembed.usage adds up to what the API billed, the cost views price it
with the current pgembed.models price, and the CLI shows spend, anomalies and failures."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from typer.testing import CliRunner

from pgembed import cli as cli_module
from pgembed import costs, pipelines
from pgembed.search import search
from tests.conftest import drain
from tests.fakeapi import fake_token_count

MODEL = "openai:text-embedding-3-small"
SMALL = pipelines.PipelineOptions(dimensions=64)
TENANTS = pipelines.PipelineOptions(dimensions=64, cost_center="tenant")
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(cli_module.app, list(args), catch_exceptions=False)


@pytest.fixture
def wide(monkeypatch):
    """Rich would truncate table cells to 80 columns under the test runner."""
    monkeypatch.setattr(cli_module.out, "width", 250)


def totals(conn, where: str = "true") -> tuple:
    return conn.execute("SELECT coalesce(sum(tokens), 0), coalesce(sum(requests), 0), "
                        "coalesce(sum(cache_hits), 0), coalesce(sum(cache_misses), 0) "
                        f"FROM pgembed.usage WHERE {where}").fetchone()


def tenant_table(conn, rows: list[tuple[int, str, str]], options: pipelines.PipelineOptions = TENANTS) -> str:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, tenant text, body text)")
    conn.cursor().executemany("INSERT INTO docs VALUES (%s, %s, %s)", rows)
    return pipelines.create(conn, "docs", "body", MODEL, options)


def usage_row(conn, days_ago: int, pipeline: str | None, model: str, purpose: str,
              tokens: int) -> None:
    """A usage row as a worker would have written it `days_ago` days ago (0: today)."""
    conn.execute("INSERT INTO pgembed.usage (at, pipeline, model, purpose, requests, inputs, tokens, "
                 "cache_misses) VALUES (CASE WHEN %(d)s = 0 THEN now() "
                 "ELSE current_date - %(d)s + time '12:00' END, "
                 "%(p)s, %(m)s, %(u)s, 1, 1, %(t)s, 1)",
                 {"d": days_ago, "p": pipeline, "m": model, "u": purpose, "t": tokens})


def test_usage_adds_up_to_what_the_api_billed_and_is_priced_at_the_current_price(conn, dsn, fake_api):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    # 60 rows, 20 distinct texts: 40 rows are answered by the cache
    conn.execute("INSERT INTO t SELECT g, 'shared text number ' || (g % 20) FROM generate_series(1, 60) g")
    name = pipelines.create(conn, "t", "body", MODEL, SMALL)
    fake_api.fail_next(1, status=429, retry_after=0.01)
    drain(dsn, batch_size=25)
    conn.execute("UPDATE t SET body = body || ' edited' WHERE id <= 5")
    drain(dsn, batch_size=25)

    tokens, requests, hits, misses = totals(conn)
    assert tokens == fake_api.tokens > 0
    assert requests == fake_api.requests, "the 429 was a request too"
    assert (hits, misses) == (40, len(set(fake_api.received))) == (40, 25)
    inputs = conn.execute("SELECT sum(inputs) FROM pgembed.usage").fetchone()[0]
    assert inputs == fake_api.inputs == 45, "the 20 texts of the 429'd request were sent too"
    purposes = dict(conn.execute("SELECT purpose, sum(tokens) FROM pgembed.cost_daily GROUP BY 1"))
    assert set(purposes) == {"backfill", "sync"}
    assert purposes["sync"] == sum(fake_token_count(f"shared text number {g} edited") for g in range(1, 6))

    # a full re-run over unchanged rows costs nothing and shows as cache hits
    conn.execute("SELECT pgembed.queue_all(%s, 'repair')", (name,))
    drain(dsn, batch_size=25)
    assert totals(conn, "purpose = 'repair'") == (0, 0, 60, 0)

    # the DBA corrects the price: history is re-priced, exactly
    conn.execute("UPDATE pgembed.models SET usd_per_1m_tokens = 0.055 WHERE model = %s", (MODEL,))
    for tokens, usd in conn.execute("SELECT tokens, usd FROM pgembed.cost_daily").fetchall():
        assert usd == tokens * Decimal("0.055") / 1_000_000
    assert conn.execute("SELECT sum(usd) FROM pgembed.cost_daily").fetchone()[0] == \
        fake_api.tokens * Decimal("0.055") / 1_000_000


def test_cost_center_expression_splits_a_shared_batch_by_tenant(conn, dsn, fake_api):
    long_text = "a considerably longer document about databases and vectors, number "
    rows = [(i, "acme", f"{long_text}{i}") for i in range(1, 21)]
    rows += [(i, "globex", f"short note {i}") for i in range(21, 41)]
    rows += [(41, "globex", f"{long_text}1")]  # same text as acme's row 1: one payer only
    tenant_table(conn, rows)
    drain(dsn, batch_size=100)  # one batch mixing both tenants

    by_tenant = {cc: (tokens, inputs, hits) for cc, tokens, inputs, hits in conn.execute(
        "SELECT cost_center, sum(tokens), sum(inputs), sum(cache_hits) "
        "FROM pgembed.cost_by_cost_center GROUP BY 1")}
    assert set(by_tenant) == {"acme", "globex"}
    assert sum(t for t, _, _ in by_tenant.values()) == fake_api.tokens
    assert by_tenant["acme"][1:] == (20, 0) and by_tenant["globex"][1:] == (20, 1)
    acme_billed = sum(fake_token_count(body) for _, _, body in rows[:20])
    globex_billed = sum(fake_token_count(body) for _, _, body in rows[20:40])
    assert by_tenant["acme"][0] > 2 * by_tenant["globex"][0]
    # split by the client's token counts, so close to (not exactly) the API's own per-text counts
    assert by_tenant["acme"][0] == pytest.approx(acme_billed, rel=0.2)
    assert by_tenant["globex"][0] == pytest.approx(globex_billed, rel=0.2)


def test_texts_that_were_never_billed_charge_nobody(conn, dsn, fake_api):
    """A rejected text (API 400) and a text refused before sending (too long) cost nothing,
    so their tenants must not be charged a share of the batch's tokens."""
    tenant_table(conn, [(1, "payer", "an ordinary sentence"),
                        (2, "rejected", "poison pill"),
                        (3, "too_long", "word " * 9000)],
                 dataclasses.replace(TENANTS, chunking="none"))  # unchunked, a too-long row fails
    fake_api.always_reject("poison")
    drain(dsn, batch_size=10, max_attempts=1)
    assert conn.execute("SELECT count(*) FROM pgembed.failures").fetchone()[0] == 2
    rows = {cc: (tokens, inputs) for cc, tokens, inputs in conn.execute(
        "SELECT cost_center, sum(tokens), sum(inputs) FROM pgembed.cost_by_cost_center GROUP BY 1")}
    assert all(inputs >= 0 for _, inputs in rows.values())
    assert rows["payer"][0] == fake_api.tokens == fake_token_count("an ordinary sentence")
    assert rows.get("rejected", (0, 0))[0] == 0
    assert rows.get("too_long", (0, 0))[0] == 0


def test_query_embeddings_are_recorded_with_purpose_query_and_the_callers_cost_center(conn, dsn, fake_api):
    name = tenant_table(conn, [(1, "acme", "stars at night"), (2, "acme", "bread and butter")])
    drain(dsn)
    billed = fake_api.tokens
    hits = search(conn, name, "what shines at night", 1, cost_center="acme")
    assert len(hits) == 1
    search(conn, name, "what shines at night", 1, cost_center="acme")  # cached: free
    row = conn.execute(
        "SELECT pipeline, requests, inputs, tokens, cache_hits, cache_misses FROM pgembed.cost_by_cost_center "
        "WHERE purpose = 'query' AND cost_center = 'acme' AND day = current_date").fetchone()
    query_tokens = fake_token_count("what shines at night")
    assert row == (name, 1, 1, query_tokens, 1, 1)
    assert fake_api.tokens == billed + query_tokens
    assert totals(conn)[0] == fake_api.tokens


def test_cost_anomalies_flag_the_runaway_reindex_and_nothing_else(conn):
    large, local = "openai:text-embedding-3-large", "local:all-MiniLM-L6-v2"  # $0.13/1M, free
    for day in range(1, 8):
        usage_row(conn, day, "docs", large, "sync", 10_000_000)      # $1.30 a day
        usage_row(conn, day, "notes", local, "sync", 1_000_000)
    usage_row(conn, 3, "docs", large, "repair", 1_000_000)          # one small repair this week
    usage_row(conn, 9, "wiki", large, "backfill", 900_000_000)      # outside the 7-day window
    usage_row(conn, 0, "docs", large, "sync", 12_000_000)           # an ordinary day
    usage_row(conn, 0, "docs", large, "repair", 200_000_000)        # $26: the runaway reindex
    usage_row(conn, 0, "notes", local, "sync", 50_000_000)          # free, but 50× its tokens
    usage_row(conn, 0, None, large, "query", 100_000)               # new, but $0.013: under the floor
    usage_row(conn, 0, "wiki", large, "backfill", 20_000_000)       # $2.60, no recent history

    found = {(r[0], r[1]): r[2:] for r in conn.execute(
        "SELECT pipeline, purpose, measure, today, daily_avg_7d, ratio FROM pgembed.cost_anomalies")}
    assert set(found) == {("docs", "repair"), ("notes", "sync"), ("wiki", "backfill")}
    measure, today, average, ratio = found[("docs", "repair")]
    assert (measure, today) == ("usd", Decimal(26))
    assert average == round(Decimal("0.13") / 7, 6)
    assert ratio == round(Decimal(26) / (Decimal("0.13") / 7), 2)
    assert found[("notes", "sync")] == ("tokens", 50_000_000, 1_000_000, 50)
    assert found[("wiki", "backfill")][2:] == (0, None), "no history: flagged, ratio unknown"

    stricter = {(r[0], r[1]) for r in conn.execute(
        "SELECT pipeline, purpose FROM pgembed.find_cost_anomalies(p_min_usd => 5, p_min_tokens => 100000000)")}
    assert stricter == {("docs", "repair")}
    # a price edit applies: the large model made free is judged by its tokens instead
    conn.execute("UPDATE pgembed.models SET usd_per_1m_tokens = 0 WHERE model = %s", (large,))
    repair = conn.execute("SELECT measure, today FROM pgembed.cost_anomalies "
                          "WHERE purpose = 'repair'").fetchone()
    assert repair == ("tokens", 200_000_000)


def test_cache_stats_report_hit_rate_and_what_the_cache_saved(conn, dsn, fake_api):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t SELECT g, 'repeated words ' || (g % 4) FROM generate_series(1, 40) g")
    pipelines.create(conn, "t", "body", MODEL, SMALL)
    drain(dsn, batch_size=10)
    conn.execute("UPDATE pgembed.models SET usd_per_1m_tokens = 0.5 WHERE model = %s", (MODEL,))
    stats = costs.cache(conn)
    assert len(stats) == 1
    s = stats[0]
    avg_tokens = conn.execute("SELECT avg(tokens) FROM pgembed.embedding_cache").fetchone()[0]
    assert (s["model"], s["dimensions"], s["entries"]) == (MODEL, [64], 4)
    assert (s["cache_hits"], s["cache_misses"], s["hit_rate"]) == (36, 4, Decimal("0.9000"))
    assert s["tokens_saved"] == round(36 * avg_tokens) > 0
    assert s["usd_saved"] == s["tokens_saved"] * Decimal("0.5") / 1_000_000


def test_costs_command_prints_spend_anomalies_and_cache(conn, dsn, fake_api, wide):
    tenant_table(conn, [(1, "acme", "stars at night"), (2, "globex", "bread and butter")])
    drain(dsn)
    usage_row(conn, 0, "docs_te3s_64", MODEL, "repair", 500_000_000)  # $10 today, no history

    by_purpose = cli("costs", "--dsn", dsn)
    assert by_purpose.exit_code == 0, by_purpose.output
    out = by_purpose.output
    assert "spend, last 7 days, by purpose" in out and "backfill" in out and "total" in out
    assert "10.000000" in out, "500M tokens at $0.02/1M"
    assert "far above the 7-day daily average" in out and "new" in out
    assert "cache" in out and MODEL in out

    by_center = cli("costs", "--days", "1", "--by", "cost-center", "--dsn", dsn)
    assert by_center.exit_code == 0, by_center.output
    assert "by cost-center" in by_center.output
    assert "acme" in by_center.output and "globex" in by_center.output
    assert cli("costs", "--by", "tenant", "--dsn", dsn).exit_code != 0
    assert cli("costs", "--days", "0", "--dsn", dsn).exit_code != 0


def test_failures_command_lists_and_requeues_parked_rows(conn, dsn, wide):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t VALUES (1, 'fine'), (2, ''), (3, '')")
    name = pipelines.create(conn, "t", "body || (1 / length(body))::text", "hash:8")
    drain(dsn, max_attempts=1)

    listed = cli("failures", "--dsn", dsn)
    assert listed.exit_code == 0, listed.output
    assert "division by zero" in listed.output
    assert name in listed.output

    retried = cli("failures", "--pipeline", name, "--retry", "--dsn", dsn)
    assert retried.exit_code == 0, retried.output
    assert "2 parked rows re-queued" in retried.output
    assert conn.execute("SELECT count(*) FROM pgembed.outbox WHERE purpose = 'retry'").fetchone()[0] == 2
    again = cli("failures", "--retry", "--dsn", dsn)
    assert "0 parked rows re-queued" in again.output and "0 parked, 2 retrying" in again.output

    unknown = cli("failures", "--pipeline", "nope", "--dsn", dsn)
    assert unknown.exit_code == 1 and 'no pipeline named "nope"' in unknown.output
