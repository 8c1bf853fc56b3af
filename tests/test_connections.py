"""Every session a worker opens is named pgembed-<role>[<worker name>], so a DBA can join
pg_stat_activity to pgembed.workers."""

from __future__ import annotations

import asyncio
import re
import time

import psycopg
import pytest

from pgembed import db, pipelines, ratelimit
from pgembed.ratelimit import Budget
from pgembed.scheduler import Job, JobContext, ScheduleConfig
from pgembed.worker import Worker, WorkerConfig
from tests.fakeapi import FakeAPI

NAME = "conn-test:4242"
ROLES = {"worker", "listener", "ratelimit", "scheduler"}
# what db.py's docstring tells a DBA to run, for the sessions on this database but ours
SESSIONS = r"""
SELECT a.application_name, w.name
  FROM pg_stat_activity a
  LEFT JOIN pgembed.workers w ON substring(a.application_name FROM '^pgembed-[a-z]+\[(.*)\]$') = w.name
 WHERE a.datname = pg_catalog.current_database() AND a.backend_type = 'client backend'
   AND a.state IS NOT NULL AND a.state <> 'starting' AND a.pid <> ALL(%s)
"""


def test_a_session_is_named_after_its_role_and_its_worker() -> None:
    assert db.application_name("worker", "host:1234") == "pgembed-worker[host:1234]"
    assert db.application_name("listener", "host:1234") == "pgembed-listener[host:1234]"
    assert db.application_name("cli") == "pgembed-cli"
    assert db.session_settings("cli")["options"] == db.SESSION_OPTIONS
    assert "options" not in db.session_settings("index", "host:1234"), "no lock timeout on index builds"


def test_a_long_worker_name_keeps_its_start_and_its_pid_within_63_bytes() -> None:
    name = "embedding-worker-7d9f8b6c5-x2k4z.eu-west-1.compute.internal.example.com:4194304"
    cut = db.application_name("ratelimit", name)
    assert len(cut.encode()) == 63
    assert cut.startswith("pgembed-ratelimit[embedding-worker") and cut.endswith(":4194304]")
    inner = re.fullmatch(r"pgembed-ratelimit\[(.*)\]", cut)
    assert inner and re.fullmatch(re.escape(inner[1]).replace(r"\.\.\.", ".*"), name), "joins with LIKE"
    assert db.application_name("worker", "hôte:1") == "pgembed-worker[h?te:1]", "bytes counted are the bytes kept"


def test_every_session_of_a_running_worker_joins_its_workers_row(conn: psycopg.Connection, dsn: str,
                                                                 fake_api: FakeAPI) -> None:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs SELECT g, 'document ' || g FROM generate_series(1, 400) g")
    pipelines.create(conn, "docs", "body", "openai:text-embedding-3-small", pipelines.PipelineOptions(dimensions=16))
    ratelimit.set_openai_budget(conn, Budget(max_requests=100_000, per_seconds=1))  # opens the limiter's session
    fake_api.latency(0.05)

    async def hold(job_conn: psycopg.AsyncConnection, _: JobContext) -> str:
        await job_conn.execute("SELECT pg_sleep(0.5)")
        return "held"

    schedule = ScheduleConfig(audit_every=None, cleanup_every=None, retry_every=None, index_every=None, eval_every=None,
                              extra_jobs=(Job("hold", 1, hold),))
    config = WorkerConfig(name=NAME, batch_size=4, bulk_batch_size=4, heartbeat_interval=0.1,
                          poll_interval=0.1, schedule=schedule)

    async def scenario() -> tuple[list[tuple[str, str | None]], set[str]]:
        worker = Worker(dsn, config)
        running = asyncio.create_task(worker.run())
        seen: list[tuple[str, str | None]] = []
        roles: set[str] = set()
        deadline = time.monotonic() + 60
        # from the first batch on: the schema check's session, closed before the workers row
        # is written, has left pg_stat_activity by then
        while worker.stats.batches == 0 and time.monotonic() < deadline and not running.done():
            await asyncio.sleep(0.02)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watcher:
            ours = [conn.info.backend_pid, watcher.info.backend_pid]
            while roles != ROLES and time.monotonic() < deadline and not running.done():
                rows = await (await watcher.execute(SESSIONS, (ours,))).fetchall()
                seen += rows
                roles |= {app.split("[")[0].removeprefix("pgembed-") for app, worker_name in rows if worker_name}
                await asyncio.sleep(0.02)
        worker.stop()
        await running
        return seen, roles

    seen, roles = asyncio.run(scenario())
    assert roles == ROLES, f"sessions seen: {sorted(set(seen))}"
    strangers = {(app, name) for app, name in seen
                 if not re.fullmatch(rf"pgembed-({'|'.join(ROLES)}|index)\[{re.escape(NAME)}\]", app) or name != NAME}
    assert not strangers, "every session of the worker names its role and its worker, and joins pgembed.workers"


def test_a_command_session_is_named_pgembed_cli(dsn: str) -> None:
    with db.connect(dsn) as cli:
        assert cli.execute("SHOW application_name").fetchone() == ("pgembed-cli",)
        assert cli.execute("SHOW lock_timeout").fetchone() == ("10s",)


@pytest.mark.parametrize(("role", "timeout"), [("listener", "2min"), ("scheduler", "0"), ("ratelimit", "30s")])
def test_each_role_gets_its_session_settings(dsn: str, role: str, timeout: str) -> None:
    async def settings() -> tuple[str, str]:
        async with await db.connect_async(dsn, role, "w:1") as session:
            name = await (await session.execute("SHOW application_name")).fetchone()
            statement = await (await session.execute("SHOW statement_timeout")).fetchone()
        assert name is not None and statement is not None
        return name[0], statement[0]

    assert asyncio.run(settings()) == (f"pgembed-{role}[w:1]", timeout)
