"""7. Memory: peak RSS of a `pgembed worker --until-empty` process (default settings, hash
provider, no vector index) draining a large backlog, against the same worker's peak on an
empty queue (what Python, psycopg, numpy, the openai client... cost before any row).

The peak is the kernel's high-water mark (VmHWM in /proc/PID/status), read every 100 ms
while the process lives, so a short spike between two reads is not missed; where /proc is
missing, the largest RSS seen is used instead.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.harness import (
    Bench,
    Result,
    at_most,
    connect,
    copy_docs,
    corpus,
    count,
    create_docs,
    create_pipeline,
    ratio,
    short,
    spawn,
    stop,
    vacuum,
)

NAME = "memory"


def peak_rss_mb(bench: Bench, dsn: str, label: str, timeout: float = 900) -> tuple[float, float]:
    """Runs a draining worker; (peak RSS in MB, seconds)."""
    import psutil

    child = spawn(bench, f"memory-{label}", ["-m", "pgembed", "worker", "--until-empty", "--dsn", dsn])
    status = Path(f"/proc/{child.pid}/status")
    peak = 0.0
    start = time.perf_counter()
    try:
        while child.poll() is None and time.perf_counter() - start < timeout:
            try:
                if status.exists():
                    for line in status.read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak = max(peak, int(line.split()[1]) / 1024)
                else:
                    peak = max(peak, psutil.Process(child.pid).memory_info().rss / 2**20)
            except (OSError, psutil.Error, ValueError):
                pass  # exited between the check and the read
            time.sleep(0.1)
        seconds = time.perf_counter() - start
    finally:
        stop(child)
    return peak, seconds


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    rows = s.memory_rows
    with bench.database() as dsn, connect(dsn) as conn:
        create_docs(conn)
        destination = create_pipeline(conn, f"hash:{s.memory_dims}", index="none")
        bench.log(f"  {NAME}: idle worker")
        idle, _ = peak_rss_mb(bench, dsn, "idle")
        bench.log(f"  {NAME}: worker draining {rows:,} rows")
        copy_docs(conn, corpus(rows))
        vacuum(conn, "pgembed.outbox")
        peak, seconds = peak_rss_mb(bench, dsn, "busy")
        stored = count(conn, destination)
    note = "" if stored == rows else f"only {stored} of {rows} rows embedded"
    return [Result(
        NAME, f"worker peak RSS, {short(rows)} backlog", peak, "MB", idle, "MB", "idle worker", ratio(peak, idle),
        "≤ 250 MB", at_most(peak, 250) and stored == rows, note=note,
        details={"rows": rows, "dimensions": s.memory_dims, "stored": stored, "drain_s": round(seconds, 2),
                 "rows_per_s": round(stored / seconds, 1), "idle_peak_mb": round(idle, 1),
                 "peak_mb": round(peak, 1)})]
