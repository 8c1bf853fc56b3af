"""Deferred vector indexes: built once their data is in, CONCURRENTLY, by one worker.

create_pipeline puts off the HNSW index of a large backfill, because inserting into an HNSW
graph row by row is many times slower than building it once over the loaded rows, and
every IVFFlat index until the table holds enough rows to train its lists on. A worker
builds it here, on a session of its own: no statement timeout (a build over millions of
rows takes minutes), maintenance_work_mem raised so that the graph is built in memory
(PostgreSQL also uses its parallel maintenance workers), CONCURRENTLY so that the
application's deletes, which remove vectors, never wait for it. An advisory lock makes
one worker in the fleet build each index; an interrupted build leaves an INVALID index,
which the next attempt drops first.

A worker looks whenever its queue runs short (DeferredIndexBuilder), at most every
INDEX_CHECK_INTERVAL seconds, and always before an --until-empty worker calls it a day.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgembed import db
from pgembed.sqlfiles import query

log = logging.getLogger("pgembed.indexes")
# How often a worker whose queue runs short looks for deferred indexes to build.
INDEX_CHECK_INTERVAL = 5.0


class DeferredIndexBuilder:
    """One worker's looks for deferred indexes to build, one at a time."""

    def __init__(self, dsn: str, worker: str, maintenance_work_mem: str, pool: AsyncConnectionPool) -> None:
        self.dsn = dsn
        self.worker = worker
        self.maintenance_work_mem = maintenance_work_mem
        self.pool = pool
        self.active = 0  # checks under way or waiting for one: the worker is not idle meanwhile
        self._lock = asyncio.Lock()
        self._next_check = 0.0
        self._failed: set[str] = set()

    async def check(self, force: bool) -> None:
        """Builds the indexes whose backfill is over. An unforced check is skipped while
        another runs or within INDEX_CHECK_INTERVAL of the last. A forced one waits for one
        under way and then looks again itself: that one may have read the plan just before
        another slot acknowledged the backfill's last rows (a worker once stopped with its
        index unbuilt that way)."""
        if not force and (self._lock.locked() or time.monotonic() < self._next_check):
            return
        self.active += 1
        try:
            async with self._lock:
                self._next_check = time.monotonic() + INDEX_CHECK_INTERVAL
                await build_ready(self.dsn, self.maintenance_work_mem, self._failed, self.pool, worker=self.worker)
        finally:
            self.active -= 1


async def build_ready(dsn: str, maintenance_work_mem: str, skip: set[str],
                      pool: AsyncConnectionPool | None = None, *, worker: str | None = None) -> list[str]:
    """Builds every deferred index whose backfill is over; returns the pipelines done.
    A pipeline whose build failed is added to `skip` (and logged once) so that a worker
    without the rights to build it does not try again on every poll. The look-up runs on
    `pool` when given (it is cheap and frequent); a build gets a session of its own."""
    built: list[str] = []
    if pool is not None:
        async with pool.connection() as pooled:
            cur = await pooled.execute(query("deferred_ready"))
            if not [row for row in await cur.fetchall() if row[0] not in skip]:
                return built
    async with await db.connect_async(dsn, "index", worker) as conn:
        cur = await conn.execute(query("deferred_ready"))
        ready = [row[0] for row in await cur.fetchall() if row[0] not in skip]
        if not ready:
            return built
        await conn.execute(query("index_session"), {"memory": maintenance_work_mem})
        for pipeline in ready:
            try:
                if await _build(conn, pipeline, worker):
                    built.append(pipeline)
            except psycopg.Error as error:
                skip.add(pipeline)
                log.warning("pipeline %s: could not build its deferred vector index (%s); searches "
                            "scan until it exists. Run the statement of pgembed.deferred_index_plan() "
                            "as the destination's owner.", pipeline, str(error).strip().splitlines()[0],
                            extra={"action": "index_failed", "pipeline": pipeline})
    return built


async def _build(conn: psycopg.AsyncConnection, pipeline: str, worker: str | None) -> bool:
    params = {"pipeline": pipeline}
    locked = await (await conn.execute(query("index_lock"), params)).fetchone()
    if not locked or not locked[0]:
        return False  # another worker is building it
    try:
        # read again under the lock: another worker may have built it meanwhile
        cur = await conn.execute(query("deferred_ready"))
        plan = next((row for row in await cur.fetchall() if row[0] == pipeline), None)
        if plan is None:
            return False
        _, create_sql, drops = plan
        for statement in drops:
            await conn.execute(statement)
        started = time.monotonic()
        log.info("pipeline %s: backfill done, building its vector index", pipeline,
                 extra={"action": "index_build", "pipeline": pipeline})
        await conn.execute(create_sql)
        await conn.execute(query("index_built"), {**params, "worker": worker})
        log.info("pipeline %s: vector index built in %.1fs", pipeline, time.monotonic() - started,
                 extra={"action": "index_built", "pipeline": pipeline})
        return True
    finally:
        await conn.execute(query("index_unlock"), params)
