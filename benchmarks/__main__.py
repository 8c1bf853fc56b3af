"""`python -m benchmarks`: runs the scenarios, prints the table, writes the JSON report.

Scenarios (targets from issue 5; every figure is measured next to its limit in one run):

  write_path   sync throughput, hash provider, 1536/768/384-d, no index and HNSW, vs binary COPY
  backfill     create_pipeline on a populated table until all is searchable,
               vs COPY + CREATE INDEX, and vs a naive row-by-row writer
  api_bound    fake API with 100 ms per request, vs batch size × concurrency / latency
  triggers     bulk INSERT … SELECT and single-row INSERT commits, with vs without a pipeline
  freshness    commit → vector visible, p50/p99, while a worker waits on LISTEN
  scale_out    1, 2, 4 worker processes against a 200 ms fake API: speed-up, no duplicates
  memory       peak RSS of a worker process draining a large backlog
  audit        SELECT * FROM pgembed.pipeline_status vs count(*) of the destination
  float_path   a server answering JSON floats: decode and drain vs base64 and vs the old reader
  quality      SciFact nDCG@10 of a default local pipeline vs exact search, same model, same run
  read_path    search p50/p99 and queries/s (SQL, Client, CLI) vs raw SQL, recall@10 vs exact
  storage      vector, halfvec and binary quantization on the same SciFact vectors: sizes, index
               build time, nDCG@10 and recall@10 vs exact search
  local_model  a local:all-MiniLM-L6-v2 drain vs model.encode of the same chunks; numpy vs torch
  late_chunking plain vs late chunking on the same SciFact table: nDCG@10 (and Recall@5, MRR@10,
               P@5) vs exact search over each one's vectors, index size and build, drain time
  gateway      200 OpenAI clients of `pgembed serve` (fake API, 100 ms): upstream/client requests,
               p50/p99 latency added over the direct API's, the cache pass's upstream requests
  write_through commit → searchable p50/p99 with write-through vs a worker on LISTEN, fake API
               at 50 ms; the embedding call itself as the floor
  batch_api    a backfill through the provider's Batch API: submit, and collect and store, in
               rows/s vs a worker draining the same rows from the same fake API
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks import report
from benchmarks.harness import REPO, SCALES, Bench, Result

SCENARIOS = ("write_path", "backfill", "api_bound", "triggers", "freshness", "scale_out", "memory", "audit",
             "float_path", "quality", "read_path", "storage",
             "local_model", "late_chunking", "gateway", "write_through", "batch_api")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="default",
                        help="size preset: default (< 10 min on 2 cores) or small (seconds)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "report.json",
                        help="where the JSON report goes (default: benchmarks/report.json)")
    parser.add_argument("--only", default="", help="comma-separated scenarios to run (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override one size of the preset, e.g. --set backfill_rows=20000 "
                             "or --set write_dims=768 (repeatable)")
    parser.add_argument("--dsn", default=os.environ.get("PGEMBED_BENCH_DSN"),
                        help="use this PostgreSQL (needs CREATE DATABASE and pgvector) instead of "
                             "starting an embedded one (env PGEMBED_BENCH_DSN)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    scale = SCALES[args.scale]
    for assignment in args.overrides:
        scale.override(assignment)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {', '.join(unknown)}; one of {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    log(f"pgembed benchmarks, scale {scale.name}: starting PostgreSQL")
    bench = Bench(scale, dsn=args.dsn, log=log)
    results: list[Result] = []
    seconds: dict[str, float] = {}
    facts: dict[str, object] = {}
    failed = False
    try:
        facts = bench.facts()
        for name in chosen:
            log(f"{name} …")
            t0 = time.perf_counter()
            try:
                module = importlib.import_module(f"benchmarks.{name}")
                got = module.run(bench)
            except Exception as error:  # one broken scenario must not hide the others
                failed = True
                traceback.print_exc()
                got = [Result(name, "", None, "", status="error",
                              note=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")]
            seconds[name] = time.perf_counter() - t0
            for r in got:
                log(f"  {r.name}: {report.cells(r)[1]} vs {report.cells(r)[2]} → ratio "
                    f"{report.cells(r)[3]} (target {r.target or '–'}: {report.cells(r)[5] or '–'})")
            log(f"{name} done in {seconds[name]:.1f}s")
            results.extend(got)
        facts["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    finally:
        bench.close()
    total = time.perf_counter() - started
    report.write_json(args.out, results=results, facts=facts, scale=scale, seconds=total,
                      scenario_seconds=seconds)
    print(report.table(results))
    extra = report.notes(results)
    if extra:
        print("\n" + extra)
    print(f"\n{len(results)} results in {total:.0f}s on {facts.get('cpu_count')} CPUs, PostgreSQL "
          f"{facts.get('postgres')}, pgvector {facts.get('pgvector')}; JSON report: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
