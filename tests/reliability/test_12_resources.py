"""12. Resources: a large backfill with bounded worker memory; a hot row updated thousands of
times keeps one outbox row and is not starved by a backlog; the outbox does not bloat
after many processed changes (its size after VACUUM stays flat)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgembed import pipelines
from tests.reliability.convergence import converge
from tests.reliability.harness import (
    FORMS,
    api_pipeline,
    body_expect,
    make_docs,
    outbox_count,
    sampling,
    scalar,
    wait_for,
)

RSS_LIMIT_MB = 300


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("form", FORMS)
def test_backfill_with_bounded_memory(form, db, fleet, results):
    rows = form.pick(20_000, 1_000_000)
    make_docs(db, "docs", rows)
    name = pipelines.create(db, "docs", "body", "hash:8", pipelines.PipelineOptions(index="none"))
    assert outbox_count(db) == rows
    started = time.monotonic()
    worker = fleet.start(batch_size=500, concurrency=2, lease=300, poll=0.5)
    report = converge(db, [body_expect(name, "docs")], timeout=form.pick(180, 3_600), vector_sample=5_000)
    peak = peak_rss_mb(worker.pid)
    assert peak < RSS_LIMIT_MB, f"worker peak RSS {peak:.0f} MB"
    elapsed = time.monotonic() - started
    results.add("12a backfill", form.name, load=f"{rows:,} rows, 1 worker, hash:8, no vector index",
                faults="none (resources)", inputs="distinct text per row", report=report,
                seconds=elapsed, worker_peak_rss_mb=round(peak), rows_per_s=round(rows / elapsed))


@pytest.mark.parametrize("form", FORMS)
def test_hot_row_keeps_one_outbox_row_and_is_not_starved(form, dsn, db, api, fleet, results):
    backlog = form.pick(2_000, 20_000)
    updates = form.pick(1_000, 10_000)
    pause = form.pick(0.004, 0.002)
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs VALUES (0, 'the hot row')")
    name = api_pipeline(db, "docs", index="none")
    api.latency(0.03)
    hot_rows: list[int] = []
    sizes: list[int] = []

    def sample(c: psycopg.Connection) -> None:
        hot_rows.append(scalar(c, "SELECT count(*) FROM pgembed.outbox WHERE key = '[\"0\"]'"))
        sizes.append(outbox_count(c))

    def hammer() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            for i in range(updates):
                c.execute("UPDATE docs SET body = %s WHERE id = 0", (f"the hot row, version {i}",))
                time.sleep(pause)

    hot_done_while_backlog: list[int] = []
    with sampling(dsn, 0.02, sample):
        # the hot row is queued first and keeps changing; then a backlog arrives behind it
        thread = threading.Thread(target=hammer)
        thread.start()
        time.sleep(0.1)
        make_docs(db, "docs", backlog)
        fleet.start(batch_size=20, concurrency=2, lease=60)
        seen = 0
        while thread.is_alive():
            received = api.received[seen:]
            seen += len(received)
            if any(t.startswith("the hot row, version") for t in received):
                hot_done_while_backlog.append(outbox_count(db))
            time.sleep(0.05)
        thread.join()
        report = converge(db, [body_expect(name, "docs")], api=api, timeout=form.pick(120, 600),
                          bound=lambda ideal: ideal + updates)
    assert max(hot_rows) == 1, "the hot row had more than one outbox row"
    assert max(sizes) <= backlog + 1
    hot_embeddings = sum(1 for t in api.received if t.startswith("the hot row"))
    assert hot_done_while_backlog and max(hot_done_while_backlog) > backlog / 20, (
        "the hot row was starved: embedded only once the backlog was gone "
        f"{[i for i, t in enumerate(api.received) if t.startswith('the hot row')]} of {len(api.received)}; "
        f"{hot_done_while_backlog}")
    results.add("12b hot row", form.name, load=f"1 row updated {updates:,} times beside a {backlog:,}-row backlog",
                faults="none (resources)", inputs="one hot key", report=report,
                hot_row_outbox_rows_max=max(hot_rows), hot_row_embeddings=hot_embeddings)


@pytest.mark.parametrize("form", FORMS)
def test_outbox_does_not_bloat(form, db, fleet, results):
    rows = form.pick(2_000, 50_000)
    rounds = form.pick(6, 20)
    make_docs(db, "docs", rows)
    name = pipelines.create(db, "docs", "body", "hash:8", pipelines.PipelineOptions(index="none"))
    fleet.start(batch_size=500, concurrency=2, lease=300, poll=0.2)
    sizes = []
    started = time.monotonic()
    for r in range(rounds):
        if r:
            db.execute("UPDATE docs SET body = body || ' r' || %s", (str(r),))
        wait_for(lambda: outbox_count(db) == 0, form.pick(120, 900),
                 f"round {r} to drain")
        db.execute("VACUUM pgembed.outbox")
        sizes.append(scalar(db, "SELECT pg_total_relation_size('pgembed.outbox')"))
    report = converge(db, [body_expect(name, "docs")], vector_sample=2_000)
    processed = rows * rounds
    assert sizes[-1] <= max(sizes[1] * 1.5, sizes[1] + 256 * 1024), f"outbox grows: {sizes}"
    results.add("12c outbox bloat", form.name, load=f"{processed:,} processed changes in {rounds} rounds",
                faults="none (resources)", inputs="distinct text per row", report=report,
                seconds=time.monotonic() - started,
                outbox_bytes_after_vacuum=f"{sizes[1]:,} → {sizes[-1]:,}")
