"""5. Freshness: single-row inserts at a steady rate while a worker waits on LISTEN; the
time from the insert's commit to its vector being visible to another session. The first
row, inserted as soon as the worker listens, is reported on its own: a worker that loads
what it needs on its first batch makes that row wait.

The worker is `pgembed worker` as a subprocess (its own GIL, default settings, hash
provider, HNSW index). A poller thread in this process looks for the pending keys in the
destination every few milliseconds; a key's latency is the time its poll first saw it
minus the time its INSERT's commit returned.

The limit is the same measurement of the least a notify-driven design can do: a minimal
writer (`python -m benchmarks.freshness floor DSN`, also a subprocess) that LISTENs, and
per notification reads the row, hashes it and inserts its vector into a table of the
destination's shape with the same index, one transaction per row.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from benchmarks.harness import (
    Bench,
    Result,
    at_most,
    connect,
    content_of,
    corpus,
    create_docs,
    create_pipeline,
    like_destination,
    percentile,
    sha256,
    spawn,
    stop,
)

NAME = "freshness"
DIMS = 384


class Poller:
    """Watches a table for keys; records when each first becomes visible."""

    def __init__(self, dsn: str, table: str, schema: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.query = sql.SQL("SELECT id FROM {}.{} WHERE id = ANY(%s)").format(
            sql.Identifier(schema), sql.Identifier(table))
        self.pending: dict[int, float] = {}  # key → commit time
        self.latency: dict[int, float] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def committed(self, key: int, at: float) -> None:
        with self.lock:
            self.pending[key] = at

    def _loop(self) -> None:
        with self.conn.cursor() as cur:
            while not self._stop.is_set():
                with self.lock:
                    keys = list(self.pending)
                if keys:
                    cur.execute(self.query, (keys,), prepare=True)
                    seen = time.perf_counter()
                    with self.lock:
                        for (key,) in cur.fetchall():
                            self.latency[key] = seen - self.pending.pop(key)
                time.sleep(0.002)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.pending:
                    return
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.conn.close()


def wait_for_listener(conn: psycopg.Connection, application_name: str, timeout: float = 30) -> None:
    """Waits for a session named `application_name`, or `application_name[<worker name>]`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE split_part(application_name, '[', 1) = %s",
                        (application_name,)).fetchone()[0]:
            time.sleep(0.3)  # LISTEN runs right after the connection is made
            return
        time.sleep(0.05)
    raise RuntimeError(f"no session named {application_name} appeared in {timeout}s")


def measure(conn: psycopg.Connection, dsn: str, source: str, target: str, schema: str,
            rows: list[tuple[int, str, str]], rate: float) -> list[float]:
    """Inserts `rows` into `source` at `rate` per second; the latencies to `target`, in s."""
    poller = Poller(dsn, target, schema)
    insert = sql.SQL("INSERT INTO {} (id, title, body) VALUES (%s, %s, %s)").format(sql.Identifier(source))
    try:
        start = time.perf_counter()
        with conn.cursor() as cur:
            for n, row in enumerate(rows):
                delay = start + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                cur.execute(insert, row, prepare=True)
                poller.committed(row[0], time.perf_counter())
        poller.wait(30)
    finally:
        poller.close()
    missing = len(rows) - len(poller.latency)
    if missing:
        raise RuntimeError(f"{missing} of {len(rows)} rows never became visible in {target}")
    return [poller.latency[r[0]] for r in rows]


def summary(latencies: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies]
    return {"p50_ms": round(percentile(ms, 50), 2), "p90_ms": round(percentile(ms, 90), 2),
            "p99_ms": round(percentile(ms, 99), 2), "max_ms": round(max(ms), 2),
            "mean_ms": round(float(np.mean(ms)), 2), "n": len(ms)}


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    bench.log(f"  {NAME}: {s.fresh_rows} inserts at {s.fresh_rate:g}/s, worker and minimal writer")
    warmup = corpus(5, offset=100_000)
    rows = corpus(s.fresh_rows)
    with bench.database() as dsn, connect(dsn) as conn:
        create_docs(conn)
        destination = create_pipeline(conn, f"hash:{DIMS}", index="hnsw")
        create_docs(conn, "floor_docs")
        like_destination(conn, destination, "floor_vectors", indexes=True)
        conn.execute("""
            CREATE FUNCTION floor_notify() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_notify('floor', NEW.id::text); RETURN NULL; END $$;
            CREATE TRIGGER floor_notify AFTER INSERT ON floor_docs
                FOR EACH ROW EXECUTE FUNCTION floor_notify();""")

        worker = spawn(bench, "freshness-worker", ["-m", "pgembed", "worker", "--dsn", dsn])
        try:
            wait_for_listener(conn, "pgembed-listener")
            first = measure(conn, dsn, "docs", destination, "pgembed", corpus(1, offset=200_000), s.fresh_rate)[0]
            measure(conn, dsn, "docs", destination, "pgembed", warmup, s.fresh_rate)
            pipeline = measure(conn, dsn, "docs", destination, "pgembed", rows, s.fresh_rate)
        finally:
            stop(worker)

        floor = spawn(bench, "freshness-floor", ["-m", "benchmarks.freshness", "floor", dsn])
        try:
            wait_for_listener(conn, "pgembed-bench-floor")
            measure(conn, dsn, "floor_docs", "floor_vectors", "public", warmup, s.fresh_rate)
            minimal = measure(conn, dsn, "floor_docs", "floor_vectors", "public", rows, s.fresh_rate)
        finally:
            stop(floor)

    got, least = summary(pipeline), summary(minimal)
    details: dict[str, Any] = {"rows": len(rows), "rate_per_s": s.fresh_rate, "dimensions": DIMS,
                               "index": "hnsw", "pipeline": got, "minimal_writer": least}
    return [
        Result(NAME, "commit→visible p50", got["p50_ms"], "ms", least["p50_ms"], "ms", "minimal writer",
               got["p50_ms"] / least["p50_ms"], "≤ 50 ms", at_most(got["p50_ms"], 50), details=details),
        Result(NAME, "commit→visible p99", got["p99_ms"], "ms", least["p99_ms"], "ms", "minimal writer",
               got["p99_ms"] / least["p99_ms"], "≤ 250 ms", at_most(got["p99_ms"], 250),
               details={"see": "the line above"}),
        Result(NAME, "first row after start", first * 1000, "ms", got["p99_ms"], "ms", "p99 once running",
               first * 1000 / got["p99_ms"], "≤ p99 once running", at_most(first * 1000, got["p99_ms"]),
               details={"first_row_ms": round(first * 1000, 2)}),
    ]


def floor_writer(dsn: str) -> None:
    """The minimal notify-driven writer: LISTEN; per key, read, hash, insert, commit."""
    from pgvector.psycopg import register_vector

    from pgembed.cache import chunk_key
    from pgembed.providers.hashing import hash_vector

    model = f"hash:{DIMS}"
    with psycopg.connect(dsn, autocommit=True, application_name="pgembed-bench-floor") as listen, \
            psycopg.connect(dsn, autocommit=True) as write:
        register_vector(write)
        listen.execute("LISTEN floor")
        read = "SELECT title, body FROM floor_docs WHERE id = %s"
        insert = ("INSERT INTO floor_vectors (id, chunk_seq, chunk, content_hash, chunk_hash, embedding) "
                  "VALUES (%s, 0, %s, %s, %s, %b)")
        for note in listen.notifies():
            key = int(note.payload)
            row = write.execute(read, (key,), prepare=True).fetchone()
            if row is None:
                continue
            text = content_of(*row)
            vector = np.asarray(hash_vector(text, DIMS), dtype=np.float32)
            write.execute(insert, (key, text, sha256(text), chunk_key(model, DIMS, text), vector), prepare=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "floor":
        with contextlib.suppress(KeyboardInterrupt):
            import signal

            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            floor_writer(sys.argv[2])
    else:
        sys.exit("usage: python -m benchmarks.freshness floor DSN")
