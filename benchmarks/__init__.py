"""pgembed benchmarks: every figure next to its physical limit, measured in the same run.

Run from the repository root::

    python -m benchmarks                      # default sizes, < 10 minutes on 2 cores
    python -m benchmarks --scale small        # seconds; what the smoke test runs
    python -m benchmarks --only write_path,backfill --set backfill_rows=20000

Each scenario starts from a fresh database cloned from a migrated template on an embedded
PostgreSQL of its own (or `--dsn`), and reports ratios rather than bare numbers: the machine
is shared and noisy, and a figure means something only next to what PostgreSQL (or the
embedding API) could do at the same moment. `python -m benchmarks --help` lists the
scenarios and every size that `--set` can change.
"""
