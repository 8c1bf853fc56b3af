"""7. Crowds: many workers on one pipeline (no deadlock, every row embedded once) and one
worker on twenty pipelines (fair progress: no pipeline starves while others finish)."""

from __future__ import annotations

import time

import pytest

from tests.reliability.convergence import converge, duplicate_inputs
from tests.reliability.harness import FORMS, api_pipeline, body_expect, make_docs, sampling, scalar


def deadlocks(conn) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return scalar(conn, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")


@pytest.mark.parametrize("form", FORMS)
def test_many_workers_one_pipeline(form, db, api, fleet, results):
    n_workers = form.pick(4, 8)
    rows = form.pick(800, 20_000)
    make_docs(db, "docs", rows)
    name = api_pipeline(db, "docs")
    api.latency(0.02)
    before = deadlocks(db)
    for _ in range(n_workers):
        fleet.start(batch_size=form.pick(16, 64), concurrency=2, lease=120)
    report = converge(db, [body_expect(name, "docs")], api=api, timeout=form.pick(120, 600),
                      bound=lambda ideal: ideal)
    assert duplicate_inputs(api.received) == 0, "a row was embedded twice"
    assert deadlocks(db) == before
    assert all(w.alive() for w in fleet.procs)
    results.add("7a crowd: many workers, one pipeline", form.name,
                load=f"{rows} rows, {n_workers} workers × 2 slots", faults="contention only",
                inputs="distinct text per row", report=report, deadlocks=deadlocks(db) - before)


@pytest.mark.parametrize("form", FORMS)
def test_one_worker_twenty_pipelines_progresses_fairly(form, dsn, db, api, fleet, results):
    per_table = form.pick(24, 500)
    names = []
    for i in range(20):
        make_docs(db, f"t{i:02d}", per_table)
        names.append(api_pipeline(db, f"t{i:02d}"))
    api.latency(0.01)
    total = 20 * per_table
    snapshots: list[dict[str, int]] = []

    def progress(conn) -> None:
        done = dict(conn.execute("SELECT p.name, count(o.key) FROM pgembed.pipelines p "
                                 "LEFT JOIN pgembed.outbox o ON o.pipeline = p.name GROUP BY 1").fetchall())
        snapshots.append({n: per_table - done.get(n, 0) for n in names})

    with sampling(dsn, 0.05, progress):
        fleet.start(batch_size=form.pick(4, 25), concurrency=2, lease=120)
        report = converge(db, [body_expect(n, f"t{i:02d}") for i, n in enumerate(names)], api=api,
                          timeout=form.pick(120, 600), bound=lambda ideal: ideal)
        time.sleep(0.1)
    assert duplicate_inputs(api.received) == 0
    # when half of all rows were embedded, every pipeline had made progress
    half = next(s for s in snapshots if sum(s.values()) >= total / 2)
    slowest = min(half.values()) / per_table
    assert slowest > 0.15, f"a pipeline starved: at half-time the slowest was {slowest:.0%} done ({half})"
    results.add("7b crowd: one worker, twenty pipelines", form.name,
                load=f"20 pipelines × {per_table} rows, 1 worker × 2 slots", faults="contention only",
                inputs="distinct text per row", report=report,
                slowest_pipeline_at_half_time=f"{slowest:.0%}", pipelines=scalar(db, "SELECT count(*) FROM "
                                                                              "pgembed.pipelines"))
