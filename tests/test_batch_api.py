"""The provider's Batch API, end to end against the fake's files and batches endpoints with
the real openai client: submit, poll, collect and cancel, each in a BatchAPI of its own (a
new pool and client, nothing kept in memory: what a restart between them leaves), and the
convergence check of the reliability suite at the end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from typer.testing import CliRunner

from pgembed import cli as cli_module
from pgembed import pipelines
from pgembed.batch_api import BatchAPI, BatchAPIError
from pgembed.providers import ProviderError
from pgembed.scheduler import JobContext, ScheduleConfig, batch_api_job
from tests.conftest import drain
from tests.reliability.convergence import Expect, converge

MODEL = "openai:text-embedding-3-small"
SMALL = pipelines.PipelineOptions(dimensions=64)
T = TypeVar("T")
runner = CliRunner()


def batch_api(dsn: str, call: Callable[[BatchAPI], Awaitable[T]]) -> T:
    async def run() -> T:
        async with BatchAPI(dsn) as api:
            return await call(api)

    return asyncio.run(run())


def docs(conn, n: int, *, backfill: bool = True) -> str:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs SELECT g, 'document ' || g || ' about topic ' || (g %% 97) "
                 "FROM generate_series(1, %s) g", (n,))
    return pipelines.create(conn, "docs", "body", MODEL, SMALL)


def expect(name: str) -> Expect:
    return Expect(name, "docs", ["id"], ["body"], lambda body: body)


def held(conn) -> int:
    return conn.execute("SELECT count(*) FROM pgembed.outbox WHERE leased_by LIKE 'batch-api:%'").fetchone()[0]


def usage(conn) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT purpose, requests, inputs, tokens, price_factor FROM pgembed.usage "
                        "ORDER BY purpose").fetchall()


def test_a_small_backfill_goes_through_a_batch_and_is_billed_at_half_price(conn, dsn, fake_api):
    name = docs(conn, 300)
    submitted = batch_api(dsn, lambda api: api.submit(name))
    assert (submitted.rows, submitted.inputs) == (300, 300)
    assert held(conn) == 300 and fake_api.requests == 0
    # in flight, but waiting for the provider, not for a worker: the queue is not stuck
    assert conn.execute("SELECT in_flight, oldest_gap FROM pgembed.pipeline_status").fetchone() == (300, None)
    drain(dsn)  # a worker takes nothing the batch holds
    assert fake_api.requests == 0 and held(conn) == 300
    fake_api.batch_api.complete()
    polled = batch_api(dsn, lambda api: api.poll())
    assert [p.provider_status for p in polled] == ["completed"]
    assert polled[0].collected is not None and polled[0].collected.stored == 300
    assert held(conn) == 0
    converge(conn, [expect(name)], api=fake_api, bound=lambda ideal: ideal)
    assert usage(conn) == [("backfill", submitted.lines, 300, fake_api.tokens, pytest.approx(0.5))]
    # a second poll or collect finds nothing to do, and bills nothing twice
    assert batch_api(dsn, lambda api: api.poll()) == []
    with pytest.raises(BatchAPIError, match="no open provider batch"):
        batch_api(dsn, lambda api: api.collect(submitted.batch or 0))
    assert len(usage(conn)) == 1


def test_a_20000_row_backfill_converges_with_rows_changed_deleted_and_failed_while_it_was_out(conn, dsn, fake_api):
    """Acceptance 5: 20,000 rows through one batch; meanwhile 500 rows are updated, 500
    deleted and 200 inserted; the line holding document 4321 fails and the batch ends expired
    with its last line unrun. Every row ends with the vector of its current text."""
    name = docs(conn, 20_000)
    submitted = batch_api(dsn, lambda api: api.submit(name))
    assert submitted.rows == 20_000 and submitted.lines >= 2
    conn.execute("UPDATE docs SET body = body || ' (edited)' WHERE id % 40 = 0")
    conn.execute("DELETE FROM docs WHERE id % 40 = 1")
    conn.execute("INSERT INTO docs SELECT g, 'a new document ' || g FROM generate_series(20001, 20200) g")
    # a delete takes its outbox row (and so the batch's hold) with it; a poll while the
    # batch is out gives the edited rows back to the workers at once
    polled = batch_api(dsn, lambda api: api.poll())
    assert polled[0].provider_status == "in_progress" and polled[0].released == 500
    drain(dsn)
    assert held(conn) == 20_000 - 1000, "the batch keeps the rows nobody changed"
    assert fake_api.inputs == 200 + 500, "the worker embedded the new rows and the edited ones only"
    fake_api.batch_api.fail_lines("document 4321 about")
    fake_api.batch_api.expire(done=submitted.lines - 1)
    collected = batch_api(dsn, lambda api: api.poll())[0].collected
    assert collected is not None and collected.provider_status == "expired"
    assert collected.failed_lines >= 2  # the expired line and the one holding document 4321
    assert collected.stored > 10_000 and collected.requeued > 0 and held(conn) == 0
    drain(dsn)  # the requeued rows converge through the normal path
    # no text embedded twice: beyond what the rows hold now, only the batch's texts of the
    # 1,000 rows edited or deleted while it was out
    converge(conn, [expect(name)], api=fake_api, vector_sample=2000, bound=lambda ideal: ideal + 1000)
    billed = conn.execute("SELECT sum(tokens), sum(inputs) FROM pgembed.usage WHERE price_factor = 0.5").fetchone()
    assert billed == (collected.tokens, fake_api.batch_api.inputs_run)


def test_lines_over_a_batch_limit_stay_queued_and_a_refusing_provider_loses_nothing(conn, dsn, fake_api,
                                                                                    monkeypatch):
    name = docs(conn, 120)
    monkeypatch.setattr("pgembed.batch_api.runs.MAX_BYTES", 3000)  # the file's size: ~70 rows
    submitted = batch_api(dsn, lambda api: api.submit(name))
    assert submitted.left > 0 and submitted.inputs + submitted.left == 120
    assert held(conn) == submitted.inputs
    fake_api.batch_api.complete()
    batch_api(dsn, lambda api: api.poll())
    # the provider refuses the next batch (a bad key): its rows are back in line at once
    fake_api.api_key = "sk-another-key"
    with pytest.raises(ProviderError, match=r"refused the batch .*back in the outbox"):
        batch_api(dsn, lambda api: api.submit(name))
    assert held(conn) == 0
    assert conn.execute("SELECT state FROM pgembed.provider_batches ORDER BY id").fetchall() == [
        ("collected",), ("cancelled",)]
    fake_api.api_key = None
    drain(dsn)
    converge(conn, [expect(name)], api=fake_api, bound=lambda ideal: ideal)


def test_bad_requests_are_refused_in_one_line_and_change_nothing(conn, dsn, fake_api, monkeypatch):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes VALUES (1, 'a note')")
    hashed = pipelines.create(conn, "notes", "body", "hash:16")
    with pytest.raises(BatchAPIError, match="the Batch API is OpenAI's"):
        batch_api(dsn, lambda api: api.submit(hashed))
    with pytest.raises(BatchAPIError, match="no pipeline 'nope'"):
        batch_api(dsn, lambda api: api.submit("nope"))
    name = docs(conn, 50)
    with monkeypatch.context() as without_key:
        without_key.delenv("PGEMBED_OPENAI_API_KEY")
        without_key.delenv("OPENAI_API_KEY", raising=False)
        with pytest.raises(ProviderError, match="no API key"):
            batch_api(dsn, lambda api: api.submit(name))
    assert held(conn) == 0
    below = batch_api(dsn, lambda api: api.submit(name, threshold=51))
    assert below.batch is None and "under the threshold of 51" in below.reason and held(conn) == 0
    submitted = batch_api(dsn, lambda api: api.submit(name))
    with pytest.raises(BatchAPIError, match="is in_progress at the provider"):
        batch_api(dsn, lambda api: api.collect(submitted.batch or 0))
    assert held(conn) == 50
    # cancelled before anything ran: every row goes back to the workers, nothing is billed
    cancelled = batch_api(dsn, lambda api: api.cancel(submitted.batch or 0))
    assert cancelled.collected is not None and cancelled.collected.requeued == 50 and held(conn) == 0
    assert usage(conn) == []
    drain(dsn)
    converge(conn, [expect(name)], api=fake_api, bound=lambda ideal: ideal + 1)


def test_the_command_line_submits_polls_and_lists_batches(conn, dsn, fake_api, monkeypatch):
    name = docs(conn, 40)
    monkeypatch.setattr(cli_module.out, "width", 80)
    sent = runner.invoke(cli_module.app, ["batch", "submit", name, "--threshold", "10", "--dsn", dsn])
    assert sent.exit_code == 0, sent.output
    assert "40 rows in 1 requests, 40 inputs" in sent.output
    listed = runner.invoke(cli_module.app, ["batch", "status", "--json", "--dsn", dsn])
    rows = json.loads(listed.output)
    assert [(r["state"], r["held"]) for r in rows] == [("submitted", 40)]
    table = runner.invoke(cli_module.app, ["batch", "status", "--dsn", dsn]).output
    assert "submitted" in table and max(len(line) for line in table.splitlines()) <= 80
    fake_api.batch_api.complete()
    polled = runner.invoke(cli_module.app, ["batch", "poll", "--dsn", dsn])
    assert "completed; collected: 40 rows stored, 0 requeued" in polled.output
    bad = runner.invoke(cli_module.app, ["batch", "collect", "99", "--dsn", dsn])
    assert bad.exit_code == 2 and "no open provider batch 99" in bad.output
    monkeypatch.setenv("PGEMBED_BATCH_API_MIN_ROWS", "many")
    bad = runner.invoke(cli_module.app, ["batch", "submit", name, "--dsn", dsn])
    assert bad.exit_code == 2 and "must be a whole number" in bad.output


def test_the_scheduled_job_sends_a_backlog_over_the_threshold_and_collects_it(conn, dsn, fake_api, monkeypatch):
    name = docs(conn, 30)
    context = JobContext(worker="w", config=ScheduleConfig(), dsn=dsn)
    assert asyncio.run(batch_api_job(conn, context)) == "no open provider batches", "opt-in only"
    monkeypatch.setenv("PGEMBED_BATCH_API_MIN_ROWS", "30")
    fake_api.batch_api.auto_complete = True
    note = asyncio.run(batch_api_job(conn, context))
    assert f"{name}: batch 1 sent, 30 rows" in note and "batch 1: completed, 30 rows stored" in note
    converge(conn, [expect(name)], api=fake_api, bound=lambda ideal: ideal)


def test_a_collection_cut_short_is_repeated_without_storing_or_billing_twice(conn, dsn, fake_api, monkeypatch):
    name = docs(conn, 1_200)
    submitted = batch_api(dsn, lambda api: api.submit(name))
    conn.execute("UPDATE docs SET body = body || ' (edited)' WHERE id <= 10")  # not given back: no poll yet
    fake_api.batch_api.complete()
    finish = BatchAPI._finish

    async def crash(self, *args, **kwargs):
        raise RuntimeError("the process died before the batch was marked collected")

    monkeypatch.setattr(BatchAPI, "_finish", crash)
    with pytest.raises(RuntimeError, match="process died"):
        batch_api(dsn, lambda api: api.poll())
    stored_before = conn.execute(f'SELECT count(*) FROM pgembed."{name}"').fetchone()[0]
    assert stored_before == 1_190, "what was stored stays stored; the edited rows were not"
    assert held(conn) == 0, "the acknowledgements gave the edited rows back to the workers"
    monkeypatch.setattr(BatchAPI, "_finish", finish)
    collected = batch_api(dsn, lambda api: api.poll())[0].collected
    assert collected is not None and collected.finished and (collected.stored, collected.requeued) == (0, 0)
    assert usage(conn) == [("backfill", submitted.lines, 1_200, fake_api.tokens, pytest.approx(0.5))]
    # the old texts of the edited rows were paid for: they are in the cache, on no row
    old = conn.execute("SELECT count(*) FROM pgembed.embedding_cache").fetchone()[0]
    assert old == 1_200
    drain(dsn)
    converge(conn, [expect(name)], api=fake_api, bound=lambda ideal: ideal + 10)


def test_lines_are_billed_to_their_purpose_and_cost_center_at_half_price(conn, dsn, fake_api):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, tenant text, body text)")
    conn.execute("INSERT INTO docs SELECT g, 't' || (g % 2), 'text ' || g FROM generate_series(1, 60) g")
    options = pipelines.PipelineOptions(dimensions=64, cost_center="tenant")
    name = pipelines.create(conn, "docs", "body", MODEL, options)
    conn.execute("UPDATE pgembed.outbox SET purpose = 'migration' WHERE key->>0 IN "
                 "(SELECT id::text FROM docs WHERE id <= 20)")
    submitted = batch_api(dsn, lambda api: api.submit(name))
    assert submitted.lines == 4, "one line per purpose and cost center"
    fake_api.batch_api.complete()
    batch_api(dsn, lambda api: api.poll())
    rows = conn.execute("SELECT purpose, cost_center, inputs, price_factor FROM pgembed.usage "
                        "ORDER BY purpose, cost_center").fetchall()
    assert rows == [("backfill", "t0", 20, 0.5), ("backfill", "t1", 20, 0.5),
                    ("migration", "t0", 10, 0.5), ("migration", "t1", 10, 0.5)]
    assert conn.execute("SELECT sum(tokens) FROM pgembed.usage").fetchone()[0] == fake_api.tokens
    converge(conn, [expect(name)], api=fake_api, bound=lambda ideal: ideal)


def test_a_batch_the_provider_failed_gives_every_row_back_and_bills_nothing(conn, dsn, fake_api):
    name = docs(conn, 80)
    submitted = batch_api(dsn, lambda api: api.submit(name))
    fake_api.batch_api.batches[submitted.provider_id or ""]["status"] = "failed"
    collected = batch_api(dsn, lambda api: api.poll())[0].collected
    assert collected is not None and (collected.stored, collected.requeued, collected.tokens) == (0, 80, 0)
    assert usage(conn) == [] and held(conn) == 0
    assert conn.execute("SELECT state, provider_status FROM pgembed.provider_batches").fetchone() == (
        "collected", "failed")
    drain(dsn)
    converge(conn, [expect(name)], api=fake_api, bound=lambda ideal: ideal)
