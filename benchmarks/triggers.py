"""4. Trigger overhead: what a pipeline costs the application's own writes.

Two tables of the same shape in one database, `plain` and `piped` (a pipeline on it), and a
connection LISTENing on pgembed's channel as a waiting worker would (a notification costs
more with a listener to signal).

* bulk: `INSERT INTO t SELECT * FROM staging` of N rows, alternating the two tables over a
  few repeats, each from an empty table and an empty, vacuumed outbox; medians compared.
  A statement this big leaves one batch of keys (pgembed.outbox_statements); the time a
  worker then takes to expand it into the outbox is in the details (worker_expand_s).
* single: one-row INSERT commits from one client, alternating plain/piped row by row so
  that both see the same noise; p50 compared.
"""

from __future__ import annotations

import threading
import time

import psycopg
from psycopg import sql

from benchmarks.harness import (
    Bench,
    Result,
    at_most,
    checkpoint,
    connect,
    copy_docs,
    corpus,
    create_docs,
    create_pipeline,
    median,
    percentile,
    ratio,
    short,
    vacuum,
)

NAME = "triggers"


class Listener:
    """A connection LISTENing on the pgembed channel that consumes every notification."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("LISTEN pgembed")
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for _ in self.conn.notifies(timeout=0.2):
                self.received += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.conn.close()


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    n = s.trigger_bulk_rows
    bench.log(f"  {NAME}: bulk {n:,} rows × {s.trigger_bulk_repeats}, single {s.trigger_single_rows:,} commits")
    bulk: dict[str, list[float]] = {"plain": [], "piped": []}
    single: dict[str, list[float]] = {"plain": [], "piped": []}
    with bench.database() as dsn, connect(dsn) as conn:
        for table in ("staging", "plain", "piped"):
            create_docs(conn, table)
        copy_docs(conn, corpus(n), "staging")
        pipeline = create_pipeline(conn, "hash:384", table="piped", index="none", backfill=False)
        vacuum(conn, "staging")
        listener = Listener(dsn)
        try:
            for table in ("plain", "piped"):  # a session's first call compiles the trigger function
                conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM staging LIMIT 10").format(sql.Identifier(table)))
            for rep in range(s.trigger_bulk_repeats):
                order = ("plain", "piped") if rep % 2 == 0 else ("piped", "plain")
                for table in order:
                    conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
                    vacuum(conn, "pgembed.outbox", "pgembed.outbox_statements")
                    checkpoint(conn, bench.scale)
                    start = time.perf_counter()
                    conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM staging").format(sql.Identifier(table)))
                    bulk[table].append(time.perf_counter() - start)
            queued = conn.execute("SELECT count(*) + pgembed.statement_keys(%s) FROM pgembed.outbox "
                                  "WHERE pipeline = %s", (pipeline, pipeline)).fetchone()[0]
            # the work the bulk statement left to a worker: its keys into the outbox
            start = time.perf_counter()
            conn.execute("SELECT pgembed.expand_statements(%s, %s)", (pipeline, n))
            expand_s = time.perf_counter() - start

            for table in ("plain", "piped"):
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
            vacuum(conn, "pgembed.outbox", "plain", "piped")
            checkpoint(conn, bench.scale)
            statements = {t: sql.SQL("INSERT INTO {} (id, title, body) VALUES (%s, %s, %s)").format(
                sql.Identifier(t)) for t in ("plain", "piped")}
            with conn.cursor() as cur:
                for i, title, body in corpus(s.trigger_single_rows):
                    for table in ("plain", "piped") if i % 2 else ("piped", "plain"):
                        start = time.perf_counter()
                        cur.execute(statements[table], (i, title, body), prepare=True)
                        single[table].append(time.perf_counter() - start)
            time.sleep(0.3)
        finally:
            listener.close()

    bulk_ratio = ratio(median(bulk["piped"]), median(bulk["plain"]))
    p50 = {t: percentile(v, 50) for t, v in single.items()}
    single_ratio = ratio(p50["piped"], p50["plain"])
    notes = [] if queued == n else [f"{queued} rows queued for {n} inserted"]
    return [
        Result(NAME, f"bulk INSERT…SELECT {short(n)}", median(bulk["piped"]), "s", median(bulk["plain"]), "s",
               "without pipeline", bulk_ratio, "≤ 1.3 × without", at_most(bulk_ratio, 1.3),
               note="; ".join(notes),
               details={"rows": n, "with_s": [round(x, 4) for x in bulk["piped"]],
                        "without_s": [round(x, 4) for x in bulk["plain"]], "queued": queued,
                        "worker_expand_s": round(expand_s, 4)}),
        Result(NAME, "single-row commit p50", p50["piped"] * 1000, "ms", p50["plain"] * 1000, "ms",
               "without pipeline", single_ratio, "≤ 1.2 × without", at_most(single_ratio, 1.2),
               details={"commits_each": len(single["plain"]), "notifications_received": listener.received,
                        "with_ms": {"p50": round(p50["piped"] * 1000, 3),
                                    "p90": round(percentile(single["piped"], 90) * 1000, 3),
                                    "p99": round(percentile(single["piped"], 99) * 1000, 3)},
                        "without_ms": {"p50": round(p50["plain"] * 1000, 3),
                                       "p90": round(percentile(single["plain"], 90) * 1000, 3),
                                       "p99": round(percentile(single["plain"], 99) * 1000, 3)}}),
    ]
