"""A long-running worker says at INFO what it is doing: one line at start, progress lines
while there is work, one line when the queue runs dry (pgembed/activity.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pgembed import activity
from pgembed.worker import Worker, WorkerConfig


async def run_until_idle(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    worker = Worker(dsn + " password=never-logged", WorkerConfig(
        concurrency=1, prefetch=0, batch_size=10, poll_interval=0.1, heartbeat_interval=0, schedule=None))
    task = asyncio.create_task(worker.run())
    for _ in range(400):
        if any(getattr(r, "action", "") == "idle" for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    worker.stop()
    await task


def test_start_progress_and_idle_lines(conn, dsn, caplog, monkeypatch):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes SELECT i, 'note ' || i FROM generate_series(1, 60) i")
    conn.execute("SELECT pgembed.create_pipeline('notes', 'body', 'hash:16')")
    monkeypatch.setattr(activity, "PROGRESS_EVERY", 0.001)
    # a slow provider, so that progress lines come while rows remain queued
    from pgembed.providers.hashing import HashProvider

    embed = HashProvider.embed

    async def slow(self, texts):
        await asyncio.sleep(0.05)
        return await embed(self, texts)

    monkeypatch.setattr(HashProvider, "embed", slow)
    caplog.set_level(logging.INFO, logger="pgembed")
    asyncio.run(run_until_idle(dsn, caplog))
    records = {a: [r for r in caplog.records if getattr(r, "action", "") == a] for a in ("start", "progress", "idle")}
    [start] = records["start"]
    assert start.levelno == logging.INFO and start.pipelines == ["notes_h16"] and start.concurrency == 1
    assert start.version == activity.version() and "never-logged" not in start.getMessage()
    assert start.database in start.getMessage()
    progress = records["progress"]
    assert progress and all(r.levelno == logging.INFO for r in progress)
    assert sum(r.written for r in progress) <= 60 and any(r.queued for r in progress)
    assert "rows/s" in progress[0].getMessage()
    [idle] = records["idle"]
    assert idle.written == 60 and "queue empty" in idle.getMessage()
    batches = [r for r in caplog.records if getattr(r, "action", "") == "batch"]
    assert all(r.levelno == logging.DEBUG for r in batches), "per-batch lines are for --verbose"
