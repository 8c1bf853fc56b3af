"""Scheduled jobs: once per period across workers, and what each job does.

Time is moved by ageing rows in SQL; the one test that needs real periods (two workers,
one-second schedule) waits on job_runs rows, not on sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import psycopg
import pytest

from pgembed import pipelines
from pgembed.scheduler import (
    Job,
    JobContext,
    ScheduleConfig,
    Scheduler,
    index_job,
    parse_duration,
)
from pgembed.worker import Worker, WorkerConfig
from tests.conftest import drain

OFF = {"audit_every": None, "cleanup_every": None, "retry_every": None, "index_every": None,
       "eval_every": None, "batch_api_every": None}


def only(**config: object) -> ScheduleConfig:
    return ScheduleConfig(**{**OFF, **config})  # type: ignore[arg-type]


def run_job(dsn: str, name: str, config: ScheduleConfig, worker: str = "w1") -> bool | None:
    return asyncio.run(Scheduler(dsn, worker, config).run_job(name))


def test_durations():
    assert parse_duration("90") == 90 and parse_duration("15m") == 900
    assert parse_duration("6h") == 21600 and parse_duration("30d") == 30 * 86400
    assert parse_duration("1.5s") == 1.5 and parse_duration(" 2H ") == 7200
    assert parse_duration("off") is None and parse_duration("0") is None
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_two_workers_run_each_job_once_per_period(conn, dsn):
    """Acceptance 3: two workers, one-second audit, ~10 s. A slow probe job (1.5 s per run on
    a 1 s schedule) shows the advisory lock: runs never overlap across workers."""
    probes: list[tuple[str, float, float]] = []

    async def probe(_: psycopg.AsyncConnection, ctx: JobContext) -> str:
        started = time.monotonic()
        await asyncio.sleep(1.5)
        probes.append((ctx.worker, started, time.monotonic()))
        return "probed"

    async def scenario() -> None:
        workers = [
            Worker(dsn, WorkerConfig(name=name, poll_interval=0.5, shutdown_timeout=5,
                                     schedule=only(audit_every=1, extra_jobs=(Job("probe", 1, probe),))))
            for name in ("w1", "w2")]
        tasks = [asyncio.create_task(w.run()) for w in workers]
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watcher:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                cur = await watcher.execute("SELECT count(*) FROM pgembed.job_runs WHERE job = 'audit' AND ok")
                if (await cur.fetchone())[0] >= 9:
                    break
                await asyncio.sleep(0.1)
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    runs = conn.execute("SELECT job, period_start, worker, ok FROM pgembed.job_runs ORDER BY started_at").fetchall()
    audits = [r for r in runs if r[0] == "audit"]
    assert len(audits) >= 9
    assert len({r[1] for r in audits}) == len(audits), "never twice in one period"
    assert all(ok for *_, ok in audits)
    seconds = sorted(r[1].timestamp() for r in audits)
    assert all(b - a >= 1 for a, b in itertools.pairwise(seconds)), "periods are one second apart"
    if conn.execute("SELECT to_regclass('pgembed.audit_runs')").fetchone()[0]:
        assert count_audit_runs(conn) == len(audits), "pgembed.audit() itself ran once per recorded run"

    probes.sort(key=lambda p: p[1])
    assert len(probes) >= 3
    for (_, _, end), (_, start, _) in itertools.pairwise(probes):
        assert start >= end, "the advisory lock kept probe runs from overlapping"
    probe_periods = [r[1] for r in runs if r[0] == "probe"]
    assert len(set(probe_periods)) == len(probe_periods)


def count_audit_runs(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pgembed.audit_runs").fetchone()[0]


def test_a_period_runs_once_and_a_held_lock_means_someone_else_runs_it(conn, dsn):
    config = only(cleanup_every=86400)
    conn.execute("SELECT pgembed.try_job_lock('cleanup')")
    assert run_job(dsn, "cleanup", config) is None, "another session holds the job"
    conn.execute("SELECT pgembed.job_unlock('cleanup')")
    assert run_job(dsn, "cleanup", config, "w1") is True
    assert run_job(dsn, "cleanup", config, "w2") is None, "this period already ran"
    assert conn.execute("SELECT worker, ok FROM pgembed.job_runs").fetchall() == [("w1", True)]


def test_cleanup_deletes_cache_entries_unused_for_the_configured_age(conn, dsn):
    conn.execute("""
        INSERT INTO pgembed.embedding_cache (content_hash, model, dimensions, embedding, last_used_at)
        SELECT sha256(g::text::bytea), 'hash:2', 2, '[1,0]', now() - make_interval(days => g)
          FROM generate_series(1, 12) g""")
    conn.execute("INSERT INTO pgembed.workers (name, host, pid, version, state, started_at, last_seen) "
                 "VALUES ('dead', 'h', 1, 'x', 'running', now() - interval '3 days', now() - interval '2 days')")
    assert run_job(dsn, "cleanup", only(cleanup_every=3600, cache_max_age=10 * 86400)) is True
    assert conn.execute("SELECT count(*) FROM pgembed.embedding_cache").fetchone()[0] == 9
    assert conn.execute("SELECT count(*) FROM pgembed.workers").fetchone()[0] == 0
    detail = conn.execute("SELECT detail FROM pgembed.job_runs WHERE job = 'cleanup'").fetchone()[0]
    assert detail.startswith("3 cache entries unused for 10d removed") and "1 dead workers" in detail


def test_parked_failures_are_retried_on_a_doubling_backoff(conn, dsn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    pipelines.create(conn, "t", "body", "hash:8", pipelines.PipelineOptions(backfill=False))
    conn.execute("""
        INSERT INTO pgembed.failures (pipeline, key, error, attempts, first_failed_at, last_failed_at, parked_at)
        VALUES ('t_h8', '["1"]', 'e', 5, now() - interval '3 hours', now() - interval '2 hours',
                now() - interval '2 hours'),   -- failing 1 h before parking: wait 1 h, due
               ('t_h8', '["2"]', 'e', 5, now() - interval '10 hours', now() - interval '2 hours',
                now() - interval '2 hours'),   -- failing 8 h before parking: wait 8 h, not due
               ('t_h8', '["3"]', 'e', 5, now(), now(), now())""")  # just parked: wait 1 h
    assert run_job(dsn, "retry", only(retry_every=900, retry_parked_after=3600)) is True
    assert conn.execute("SELECT key, purpose FROM pgembed.outbox").fetchall() == [(["1"], "retry")]
    parked = conn.execute("SELECT key FROM pgembed.failures WHERE parked_at IS NOT NULL ORDER BY key").fetchall()
    assert parked == [(["2"],), (["3"],)]
    detail = conn.execute("SELECT detail FROM pgembed.job_runs").fetchone()[0]
    assert detail == "1 parked failures re-queued"


def test_ivfflat_upkeep_leaves_the_first_build_to_the_workers_then_advises_a_rebuild(conn, dsn, caplog):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 300) g")
    name = pipelines.create(conn, "t", "body", "hash:8",
                            pipelines.PipelineOptions(index="ivfflat", index_options={"lists": 2}))

    def indexes() -> list[tuple[str, str]]:
        return conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'pgembed' "
                            "AND tablename = %s AND indexdef LIKE '%%ivfflat%%'", (name,)).fetchall()

    async def upkeep(min_rows: int) -> str:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            return await index_job(c, JobContext("w1", only(ivfflat_min_rows=min_rows)))

    assert indexes() == [], "no untrained index on the empty table"
    assert "its first index is built by a worker" in asyncio.run(upkeep(50))
    assert indexes() == []
    drain(dsn)  # 300 rows, 200 needed for 2 lists: the worker builds it
    built = conn.execute("SELECT index_name, lists, rows_at_build FROM pgembed.index_builds").fetchone()
    assert built[1:] == (2, 300)
    assert [i[0] for i in indexes()] == [built[0]]
    assert asyncio.run(upkeep(50)) == f"{name}: ok"

    conn.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(301, 1300) g")
    drain(dsn)
    with caplog.at_level(logging.WARNING, logger="pgembed.scheduler"):
        assert "rebuild advised" in asyncio.run(upkeep(50))
    advice = [r for r in caplog.records if getattr(r, "action", "") == "index_rebuild_advised"]
    assert len(advice) == 1 and "1300 vectors" in advice[0].getMessage()
    assert [i[0] for i in indexes()] == [built[0]], "a rebuild is advised, not done behind the DBA's back"

    conn.execute("DELETE FROM pgembed.index_builds")  # the DBA's go-ahead, as the advice says
    assert "trained on 1300 rows, 2 lists" in asyncio.run(upkeep(50))
    rebuilt = conn.execute("SELECT index_name, lists, rows_at_build FROM pgembed.index_builds").fetchone()
    assert rebuilt[1:] == (2, 1300) and [i[0] for i in indexes()] == [rebuilt[0]]


def test_the_scheduler_publishes_its_schedule(conn, dsn):
    conn.execute("INSERT INTO pgembed.schedules (job, every) VALUES ('index', '1 minute')")

    async def start_and_stop() -> None:
        scheduler = Scheduler(dsn, "w1", only(audit_every=3600, retry_every=900))
        await scheduler.start()
        await scheduler.stop(5)

    asyncio.run(start_and_stop())
    runs = {job: (every, next_run_at, settings) for job, every, next_run_at, settings in conn.execute(
        "SELECT job, every, next_run_at, settings FROM pgembed.schedules")}
    assert set(runs) == {"audit", "retry"}, "a job this worker runs 'off' is no longer shown"
    now = conn.execute("SELECT now()").fetchone()[0]
    assert all(next_run_at > now for _, next_run_at, _ in runs.values())
    every, next_run_at, settings = runs["retry"]
    assert every.total_seconds() == 900 and next_run_at.timestamp() % 900 == 0
    assert settings == {"parked_after": "1h", "parked_max": "7d"}
