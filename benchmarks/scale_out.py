"""6. Scale-out: 1, 2, 4 and 8 `pgembed worker --until-empty` processes draining one queue
through the fake API (a subprocess, 200 ms per request, openai:text-embedding-3-small at
256 dimensions): speed-up over one worker, and proof that nothing was embedded twice (the
API received exactly one input per row; every row is stored once, the queue is empty).

Throughput is measured while every worker is up: from the moment each process holds a lease
(polled every 20 ms) to the moment the last row is visible, over the rows stored in that
window. Starting a worker costs about two CPU-seconds of imports, so four starting at once
on two cores would otherwise be measured against each other's start-up. The whole drain
(first API request → last row) and wall-clock times from launch to the last exit are in
the details.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.harness import (
    Bench,
    Result,
    at_least,
    children_cpu,
    connect,
    copy_docs,
    corpus,
    count,
    cpu_now,
    create_docs,
    create_pipeline,
    ratio,
    spawn,
    stop,
    vacuum,
)
from pgembed.worker import WorkerConfig

NAME = "scale_out"
MODEL = "openai:text-embedding-3-small"


def drain_with(bench: Bench, workers: int) -> dict[str, Any]:
    s = bench.scale
    rows = s.scale_rows
    api = bench.fake_api(s.scale_latency)
    with bench.database() as dsn, connect(dsn) as conn:
        create_docs(conn)
        destination = create_pipeline(conn, MODEL, dimensions=s.scale_dims, index="none")
        copy_docs(conn, corpus(rows))
        vacuum(conn, "pgembed.outbox")
        api.reset(s.scale_latency)
        before, api_before = cpu_now(bench), api.cpu()
        children_before = children_cpu()
        launched = time.perf_counter()
        children = [spawn(bench, f"scale-{workers}-{i}", ["-m", "pgembed", "worker", "--until-empty", "--dsn", dsn],
                          env=api.env()) for i in range(workers)]
        first = done = all_up = None
        stored_when_all_up = 0
        reruns = 0
        try:
            deadline = launched + 600
            while time.perf_counter() < deadline:
                now = time.perf_counter()
                if first is None and api.stats()["requests"] > 0:
                    first = now
                if all_up is None and first is not None:
                    leasing = conn.execute("SELECT count(DISTINCT leased_by) FROM pgembed.outbox "
                                           "WHERE lease_id IS NOT NULL").fetchone()[0]
                    if leasing >= workers:
                        all_up, stored_when_all_up = now, count(conn, destination)
                if first is not None and count(conn, destination) >= rows:
                    done = time.perf_counter()
                    break
                if all(c.poll() is not None for c in children):
                    if reruns >= 3:
                        break
                    # every worker exited with rows still queued: one more drains them,
                    # and its time counts (an --until-empty worker must not leave rows)
                    reruns += 1
                    children.append(spawn(bench, f"scale-{workers}-rerun{reruns}",
                                          ["-m", "pgembed", "worker", "--until-empty", "--dsn", dsn],
                                          env=api.env()))
                time.sleep(0.02)
            for c in children:
                c.wait(120)
            exited = time.perf_counter()
        finally:
            for c in children:
                stop(c)
        used = cpu_now(bench) - before
        workers_cpu = children_cpu() - children_before
        api_cpu = api.cpu() - api_before
        stats = api.stats()
        stored = count(conn, destination)
        queued = conn.execute("SELECT count(*) + pgembed.statement_keys() FROM pgembed.outbox").fetchone()[0]
        distinct = conn.execute(f'SELECT count(DISTINCT id) FROM pgembed."{destination}"').fetchone()[0]
    if done is None or first is None:
        raise RuntimeError(f"{workers} workers exited with {stored} of {rows} rows stored")
    if all_up is None or rows - stored_when_all_up < rows // 4:
        # too few rows were left once every worker was up: fall back on the whole drain
        all_up, stored_when_all_up = first, 0
    return {"workers": workers, "rows": rows, "stored": stored, "distinct_keys": distinct, "queued_after": queued,
            "api_inputs": stats["inputs"], "api_requests": stats["requests"],
            "max_in_flight": stats["max_in_flight"], "duplicates": stats["inputs"] - rows, "reruns": reruns,
            "drain_s": round(done - first, 3), "drain_rows_per_s": round(rows / (done - first), 1),
            "all_up_after_s": round(all_up - launched, 3), "rows_while_all_up": rows - stored_when_all_up,
            "rows_per_s": (rows - stored_when_all_up) / (done - all_up),
            "wall_s": round(exited - launched, 3), "startup_s": round(first - launched, 3),
            "workers_cpu_s": round(workers_cpu, 3), "fake_api_cpu_s": round(api_cpu, 3),
            "server_cpu_s": None if used.server is None else round(used.server, 3)}


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    defaults = WorkerConfig()
    per_worker_bound = defaults.batch_size * defaults.concurrency / s.scale_latency
    runs = []
    for n in s.scale_workers:
        bench.log(f"  {NAME}: {n} worker process(es), {s.scale_rows:,} rows, {s.scale_latency * 1000:.0f} ms/request")
        runs.append(drain_with(bench, n))
    base = runs[0]
    results = []
    for r in runs:
        clean = r["duplicates"] == 0 and r["stored"] == r["rows"] == r["distinct_keys"] and r["queued_after"] == 0
        note = "" if clean else (f"{r['duplicates']} duplicate inputs, {r['stored']} stored, "
                                 f"{r['distinct_keys']} distinct keys, {r['queued_after']} still queued")
        if r["reruns"]:
            clean = False
            note = "; ".join(filter(None, [note, f"the workers exited with rows still queued; {r['reruns']} "
                                                 "more worker(s) had to be started to finish"]))
        if r is base:
            rr = ratio(r["rows_per_s"], per_worker_bound * r["workers"])
            results.append(Result(
                NAME, f"{r['workers']} worker", r["rows_per_s"], "rows/s", per_worker_bound * r["workers"],
                "rows/s", f"{defaults.batch_size} × {defaults.concurrency} / {s.scale_latency:g}s", rr,
                "0 duplicates", clean, note=note, details=r))
            continue
        speedup = ratio(r["rows_per_s"], base["rows_per_s"])
        target = "≥ 3.2 × 1 worker, 0 duplicates" if r["workers"] == 4 else "0 duplicates"
        met = clean if r["workers"] != 4 else (at_least(speedup, 3.2) and clean)
        results.append(Result(
            NAME, f"{r['workers']} workers speed-up", speedup, "×", float(r["workers"]), "×", "linear",
            ratio(speedup, r["workers"]), target, met, note=note,
            details={**r, "speedup": speedup}))
    return results
