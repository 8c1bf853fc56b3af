"""8. Audit views: `SELECT * FROM pgembed.pipeline_status` on N source rows (a million by
default) against `SELECT count(*)` of the destination table, the least any status view
must read.

The data is made in SQL, not by a worker (a million embeddings would take the whole time
budget): the destination gets every row's content, its sha256 and a constant vector of
`audit_dims` dimensions, as the worker would store them, then some drift is added so that
every gap kind has rows: 0.1% of the rows are missing, 0.1% changed since (stale and
queued), 0.01% of the vectors are orphans. Both queries run once to warm the cache, then
`audit_repeats` times each, alternating; medians are compared. The EXPLAIN ANALYZE of the
view goes into the details.

If pipeline_status does not exist (the audit work is not merged), the scenario is reported
as skipped rather than failed.
"""

from __future__ import annotations

import time

from psycopg import sql

from benchmarks.harness import (
    CONTENT,
    Bench,
    Result,
    at_most,
    connect,
    create_docs,
    create_pipeline,
    median,
    ratio,
    short,
    vacuum,
)

NAME = "audit"


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    n, dims = s.audit_rows, s.audit_dims
    case = f"pipeline_status at {short(n)} rows"
    with bench.database() as dsn, connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('pgembed.pipeline_status')").fetchone()[0] is None:
            return [Result(NAME, case, None, "ms", status="skipped", note="view missing",
                           target="≤ 5 × count(*)")]
        bench.log(f"  {NAME}: making {n:,} source rows and their vectors")
        create_docs(conn)
        conn.execute("INSERT INTO docs SELECT g, 'Document ' || g, 'body of row ' || g || ': ' || md5(g::text) "
                     "|| ' ' || md5((g * 7)::text) FROM generate_series(1, %s) g", (n,))
        model = f"hash:{dims}"
        destination = create_pipeline(conn, model, index="none", backfill=False)
        dest = sql.Identifier(destination)
        conn.execute(sql.SQL("""
            INSERT INTO pgembed.{dest} (id, chunk_seq, chunk, content_hash, chunk_hash, embedding)
            SELECT id, 0, c, sha256(convert_to(c, 'UTF8')),
                   sha256(convert_to({model} || chr(31) || {dims} || chr(31) || c, 'UTF8')),
                   {vector}::vector
              FROM (SELECT id, {content} AS c FROM docs WHERE id % 1000 <> 7) s""").format(
            dest=dest, model=sql.Literal(model), dims=sql.Literal(str(dims)),
            vector=sql.Literal("[" + ",".join(["0.1"] * dims) + "]"), content=sql.SQL(CONTENT)))
        conn.execute("UPDATE docs SET body = body || ' (edited)' WHERE id % 1000 = 3")  # stale + queued
        conn.execute(sql.SQL("""
            INSERT INTO pgembed.{dest} (id, chunk_seq, chunk, content_hash, chunk_hash, embedding)
            SELECT -g, 0, 'gone', sha256('gone'), sha256('gone'), {vector}::vector
              FROM generate_series(1, greatest(%s / 10000, 1)) g""").format(
            dest=dest, vector=sql.Literal("[" + ",".join(["0.1"] * dims) + "]")), (n,))
        vacuum(conn, "docs", f"pgembed.{destination}", "pgembed.outbox")

        status = sql.SQL("SELECT * FROM pgembed.pipeline_status")
        counting = sql.SQL("SELECT count(*) FROM pgembed.{}").format(dest)
        conn.execute(counting).fetchall()
        row = conn.execute(status)
        columns = [c.name for c in row.description or []]
        first = dict(zip(columns, row.fetchone() or (), strict=False))
        timings: dict[str, list[float]] = {"status": [], "count": []}
        for _ in range(s.audit_repeats):
            for key, query in (("count", counting), ("status", status)):
                start = time.perf_counter()
                conn.execute(query).fetchall()
                timings[key].append(time.perf_counter() - start)
        plan = [r[0] for r in conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + status).fetchall()]

    figure, limit = median(timings["status"]) * 1000, median(timings["count"]) * 1000
    r = ratio(figure, limit)
    return [Result(
        NAME, case, figure, "ms", limit, "ms", "count(*) of destination", r, "≤ 5 × count(*)", at_most(r, 5.0),
        details={"rows": n, "dimensions": dims, "status_ms": [round(t * 1000, 1) for t in timings["status"]],
                 "count_ms": [round(t * 1000, 1) for t in timings["count"]],
                 "view": {k: str(v) for k, v in first.items()}, "explain_analyze": plan[:80]})]
