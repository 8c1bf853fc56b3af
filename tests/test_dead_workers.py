"""Rows never sit behind a worker that died: a worker killed with -9 while it holds rows
stops beating, and a live worker gives its rows back within seconds (not when the lease
expires) and marks it dead in pgembed.workers (kept a day, never counted as running). A
drain never calls the queue empty while other workers hold rows: it waits for them, or ends
non-zero saying who holds them."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from pgembed.worker import Unfinished, Worker, WorkerConfig
from tests.conftest import drain
from tests.test_service import DEST, backlog, count, leased, spawn, wait_for


def test_rows_of_a_killed_worker_come_back_in_seconds(conn, dsn, fake_api, tmp_path):
    backlog(conn, 150)
    fake_api.hang(1000, seconds=120)
    proc = spawn(dsn, tmp_path, "--name", "doomed", "--heartbeat-interval", "0.5", "--batch-size", "150",
                 "--lease-seconds", "300", "--no-scheduler")
    try:
        wait_for(lambda: leased(conn) == 150 and fake_api.in_flight > 0, "the worker to hold every row")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert count(conn, "SELECT count(*) FROM pgembed.workers WHERE name = 'doomed' AND state = 'running'") == 1
    fake_api.release()
    started = time.monotonic()
    stats = drain(dsn, heartbeat_interval=0.5, batch_size=150)
    assert time.monotonic() - started < 30, "given back after a few heartbeats, not the 300 s lease"
    assert stats.written == 150
    assert count(conn, f"SELECT count(*) FROM pgembed.{DEST}") == 150
    assert count(conn, "SELECT count(*) FROM pgembed.outbox") == 0
    assert conn.execute("SELECT state FROM pgembed.workers WHERE name = 'doomed'").fetchall() == [("dead",)]
    # the same name again: the new process takes the row over, and leaves none when it exits
    drain(dsn, name="doomed", heartbeat_interval=0.5)
    assert count(conn, "SELECT count(*) FROM pgembed.workers WHERE name = 'doomed'") == 0


def _worker_row(conn, name: str, seen_ago: str, state: str = "running") -> None:
    conn.execute("INSERT INTO pgembed.workers (name, host, pid, version, state, started_at, last_seen) "
                 "VALUES (%s, 'h', 1, 'v', %s, now() - %s::interval, now() - %s::interval)",
                 (name, state, seen_ago, seen_ago))


def test_a_dead_worker_is_marked_dead_then_forgotten_after_a_day(conn):
    _worker_row(conn, "alive", "0 s")
    _worker_row(conn, "silent", "1 minute")
    _worker_row(conn, "long-dead", "25 hours", state="dead")
    _worker_row(conn, "recently-dead", "2 hours", state="dead")
    conn.execute("INSERT INTO pgembed.outbox (pipeline, key, lease_id, leased_by, available_at) "
                 "VALUES ('p', '[1]', gen_random_uuid(), 'silent', now() + interval '1 hour')")
    found = conn.execute("SELECT worker, rows FROM pgembed.release_dead_workers(30, 'alive')").fetchall()
    assert found == [("silent", 1)], "a dead worker is found dead once"
    assert dict(conn.execute("SELECT name, state FROM pgembed.workers")) == {
        "alive": "running", "silent": "dead", "recently-dead": "dead"}
    assert conn.execute("SELECT lease_id FROM pgembed.outbox").fetchone() == (None,)
    assert conn.execute("SELECT * FROM pgembed.release_dead_workers(30, 'alive')").fetchall() == []


def test_a_worker_judged_dead_is_running_again_with_its_next_beat(conn):
    _worker_row(conn, "paused", "2 hours", state="dead")
    conn.execute("SELECT pgembed.heartbeat('paused', 'h2', 2, 'v', 'running', 4, 0, 0, 0, 0, true)")
    row = conn.execute("SELECT state, host, pid, last_seen > now() - interval '1 minute' "
                       "FROM pgembed.workers WHERE name = 'paused'").fetchone()
    assert row == ("running", "h2", 2, True)


def test_a_drain_waits_for_rows_another_worker_holds_then_says_who_holds_them(conn, dsn, fake_api):
    backlog(conn, 20)
    fake_api.hang(1000, seconds=120)
    other = Worker(dsn, WorkerConfig(name="slowpoke", batch_size=20, heartbeat_interval=0.5))
    thread = threading.Thread(target=lambda: asyncio.run(other.run()))
    thread.start()
    try:
        wait_for(lambda: leased(conn) == 20 and fake_api.in_flight > 0, "the other worker to hold every row")
        with pytest.raises(Unfinished, match="20 rows are still leased by slowpoke after waiting 1s"):
            drain(dsn, until_empty_wait=1.0, heartbeat_interval=0.5)
        # a drain that may wait longer sees them through: the other worker answers meanwhile
        threading.Timer(1.0, fake_api.release).start()
        drain(dsn, until_empty_wait=60.0, heartbeat_interval=0.5)
        assert count(conn, f"SELECT count(*) FROM pgembed.{DEST}") == 20
        assert count(conn, "SELECT count(*) FROM pgembed.outbox") == 0
    finally:
        fake_api.release()
        other.stop()
        thread.join(30)
