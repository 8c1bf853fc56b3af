"""OpenAI's Batch API for huge backfills: half the price, within 24 hours, no rate limit.

`runs.BatchAPI` submits a pipeline's bulk rows (backfill, repair, migration) as one batch,
polls it, collects it into the destination with the worker's fencing, and cancels it;
`jsonl` writes the request lines and reads the answers. The states live in
pgembed.provider_batches (sql/batch_api.sql), so any process may collect what another
submitted. `pgembed batch ...` is the command line; the scheduler's `batch_api` job polls.
"""

from pgembed.batch_api.runs import (
    DEFAULT_MIN_ROWS,
    MIN_ROWS_VARIABLE,
    BatchAPI,
    BatchAPIError,
    Collected,
    Polled,
    Submitted,
    min_rows,
)

__all__ = ["DEFAULT_MIN_ROWS", "MIN_ROWS_VARIABLE", "BatchAPI", "BatchAPIError", "Collected", "Polled",
           "Submitted", "min_rows"]
