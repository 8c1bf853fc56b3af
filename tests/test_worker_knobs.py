"""Each worker setting means one thing, the thing its --help says (against the fake API).

`--concurrency N` is the bound on requests in flight: no other setting caps it silently
(the OpenAI provider's own PGEMBED_OPENAI_CONCURRENCY of 4 did). `--batch-size` alone
scales bulk claims too (4×), and `--bulk-batch-size`, when given, is used as it is."""

from __future__ import annotations

import pytest

from pgembed import pipelines
from pgembed.config import WorkerConfig
from tests.conftest import drain

MODEL = "openai:text-embedding-3-small"
SMALL = pipelines.PipelineOptions(dimensions=16)


def table_with_rows(conn, rows: int) -> None:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t SELECT g, 'row number ' || g FROM generate_series(1, %s) g", (rows,))


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_concurrency_n_gives_up_to_n_requests_in_flight(conn, dsn, fake_api, monkeypatch, concurrency):
    monkeypatch.setenv("PGEMBED_OPENAI_CONCURRENCY", "2")  # the provider's own cap: not the worker's
    table_with_rows(conn, 12 * concurrency)
    pipelines.create(conn, "t", "body", MODEL, SMALL)
    fake_api.latency(0.3)  # long enough for every slot's request to be out at once
    drain(dsn, concurrency=concurrency, batch_size=2, bulk_batch_size=2, prefetch=1)
    assert fake_api.max_in_flight == concurrency
    assert conn.execute("SELECT count(*) FROM pgembed.t_te3s_16").fetchone()[0] == 12 * concurrency


def test_live_and_bulk_batches_share_the_concurrency(conn, dsn, fake_api):
    """Bulk batches keep to their share of the rate budget through a provider of their own,
    which shares the live provider's request slots: together, still --concurrency at most."""
    table_with_rows(conn, 24)
    pipelines.create(conn, "t", "body", MODEL, SMALL)  # the 24 rows: bulk (the backfill)
    conn.execute("INSERT INTO t SELECT i, 'live row ' || i FROM generate_series(100, 123) AS i")  # live
    fake_api.latency(0.3)
    drain(dsn, concurrency=2, batch_size=2, bulk_batch_size=2, prefetch=2)
    assert fake_api.max_in_flight == 2
    assert conn.execute("SELECT count(*) FROM pgembed.t_te3s_16").fetchone()[0] == 48


def request_sizes(fake_api) -> list[int]:
    return [len(entry["input"]) for entry in fake_api.log]


def test_batch_size_alone_scales_the_bulk_claims(conn, dsn, fake_api):
    table_with_rows(conn, 200)
    pipelines.create(conn, "t", "body", MODEL, SMALL)  # a backfill: bulk work
    drain(dsn, concurrency=1, prefetch=0, batch_size=10)
    sizes = request_sizes(fake_api)
    assert sizes[0] == 10  # the first claim is a normal one ...
    assert set(sizes[1:-1]) == {40}, sizes  # ... then 4 × batch size while the backlog lasts
    assert sum(sizes) == 200


def test_a_bulk_batch_size_smaller_than_the_batch_size_is_used_as_given(conn, dsn, fake_api):
    table_with_rows(conn, 60)
    pipelines.create(conn, "t", "body", MODEL, SMALL)
    drain(dsn, concurrency=1, prefetch=0, batch_size=20, bulk_batch_size=5)
    sizes = request_sizes(fake_api)
    assert sizes[0] == 20 and set(sizes[1:]) == {5}, sizes


def test_changes_made_by_the_application_keep_the_batch_size(conn, dsn, fake_api):
    table_with_rows(conn, 0)
    pipelines.create(conn, "t", "body", MODEL, SMALL)
    conn.execute("INSERT INTO t SELECT g, 'live row ' || g FROM generate_series(1, 90) g")
    drain(dsn, concurrency=1, prefetch=0, batch_size=30, bulk_batch_size=500)
    assert request_sizes(fake_api) == [30, 30, 30]


def test_the_default_bulk_claim_is_four_batches():
    assert WorkerConfig().bulk_claim == 512
    assert WorkerConfig(batch_size=10).bulk_claim == 40
    assert WorkerConfig(batch_size=10, bulk_batch_size=3).bulk_claim == 3
