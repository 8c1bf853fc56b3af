"""What a batch writes after its callers were answered: its new cache entries and its usage
rows, so that no caller waits for them (issue 15: the gateway adds at most its window).

`AsyncClient` hands each batch's rows to one `Recorder`, which writes them from one task,
in one transaction and one pipelined round trip per turn; rows added while a turn runs are
written together by the next one. A turn starts `delay` (the batching window) after the rows
that open it: by then their callers have their answers (a turn started at once would run its
statements between the answer's wake-ups), and the turn takes the batches of that window too.
A vector not yet written is still found (`unwritten`): a text asked again meanwhile is a
cache hit, not a second upstream input.

`aclose` writes whatever is pending, so a clean shutdown loses nothing. A crash between an
answer and its turn (milliseconds) loses that batch's usage rows and cache entries: the
ledger then undercounts what the provider billed for requests already answered, and those
texts are embedded again when next asked. A turn the database refuses is logged with what
it dropped, as the in-line write before it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import numpy as np
from psycopg_pool import AsyncConnectionPool

from pgembed.sqlfiles import query

log = logging.getLogger("pgembed.recorder")


class Recorder:
    """Cache entries (`query_cache_put` parameters) and usage rows (`query_usage`'s),
    written soon after `add`, in the order added."""

    def __init__(self, pool: AsyncConnectionPool, delay: float = 0.0) -> None:
        self._pool = pool
        self._delay = delay
        self._closing = asyncio.Event()
        self._cache: list[dict[str, Any]] = []
        self._usage: list[dict[str, Any]] = []
        self._vectors: dict[bytes, np.ndarray] = {}  # the cache entries added, until written
        self._task: asyncio.Task[None] | None = None
        self._writing = 0  # rows of the turn under way

    @property
    def pending(self) -> int:
        """Rows added and not yet written."""
        return len(self._cache) + len(self._usage) + self._writing

    def unwritten(self, content_hash: bytes) -> np.ndarray | None:
        """The vector of a cache entry added and not yet written, if any."""
        return self._vectors.get(content_hash)

    def add(self, cache: list[dict[str, Any]], usage: list[dict[str, Any]]) -> None:
        self._cache += cache
        self._vectors.update((row["hash"], row["embedding"]) for row in cache)
        self._usage += usage
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        with contextlib.suppress(TimeoutError):  # `aclose` does not wait out the delay
            await asyncio.wait_for(self._closing.wait(), self._delay)
        while self._cache or self._usage:
            cache, usage, self._cache, self._usage = self._cache, self._usage, [], []
            self._writing = len(cache) + len(usage)
            try:
                await self._write(cache, usage)
            except Exception as error:  # nobody waits for this task: say what is lost
                log.warning("could not record %d cache entries and %d usage rows: %s",
                            len(cache), len(usage), error)
            self._writing = 0
            for row in cache:
                self._vectors.pop(row["hash"], None)

    async def _write(self, cache: list[dict[str, Any]], usage: list[dict[str, Any]]) -> None:
        async with self._pool.connection() as conn, conn.pipeline(), conn.cursor() as cur:
            if cache:
                await cur.executemany(query("query_cache_put"), cache)
            if usage:
                await cur.executemany(query("query_usage"), usage)

    async def aclose(self) -> None:
        """Write everything added so far (a clean shutdown loses nothing)."""
        self._closing.set()
        while self._task is not None and not self._task.done():
            await self._task
