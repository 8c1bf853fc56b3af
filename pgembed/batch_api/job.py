"""The scheduler's `batch_api` job: polls the open provider batches and collects the ones
that are done; with PGEMBED_BATCH_API_MIN_ROWS set, also sends each OpenAI pipeline's bulk
backlog of at least that many rows as a batch (opt-in: it takes the rows from the workers
for up to a day)."""

from __future__ import annotations

import os
from typing import Any

from pgembed.batch_api.runs import MIN_ROWS_VARIABLE, BatchAPI


async def batch_api_job(conn: Any, ctx: Any) -> str:
    """`conn` holds the job's lock; the batches are worked on through a pool of their own."""
    notes: list[str] = []
    async with BatchAPI(ctx.dsn) as api:
        if os.environ.get(MIN_ROWS_VARIABLE, "").strip():
            for info in (await api.queue.pipelines()).values():
                if info.spec.provider != "openai" or info.late_chunking:
                    continue
                sent = await api.submit(info.name, threshold=None)
                if sent.provider_id is not None:
                    notes.append(f"{info.name}: batch {sent.batch} sent, {sent.rows} rows")
        if await api.open_batches():
            for p in await api.poll():
                done = f", {p.collected.stored} rows stored" if p.collected else ""
                notes.append(f"batch {p.batch}: {p.provider_status}{done}")
    return "; ".join(notes) or "no open provider batches"
