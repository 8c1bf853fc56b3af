"""2. PostgreSQL stopped and started in the middle of a drain, then every worker session
(the LISTEN one included) terminated: workers reconnect, listen again, and finish; no
worker session is ever idle in a transaction across an API call."""

from __future__ import annotations

import time

import psycopg
import pytest

from pgembed import migrate
from tests.reliability.convergence import converge
from tests.reliability.harness import (
    FORMS,
    ROLE,
    Fleet,
    OwnServer,
    api_env,
    api_pipeline,
    body_expect,
    connect,
    make_docs,
    outbox_count,
    sampling,
    scalar,
    wait_for,
    worker_backends,
)

API_LATENCY = 1.5  # a transaction spanning an API call would be idle this long...
IDLE_LIMIT = 1.0   # ...and an acknowledgement never idles this long, even on a busy machine


@pytest.fixture
def server():
    own = OwnServer()
    yield own
    own.close()


@pytest.mark.parametrize("form", FORMS)
def test_postgres_restart_and_terminated_sessions(form, server, api, tmp_path, results):
    rows = form.pick(240, 6_000)
    restarts = form.pick(["fast"], ["fast", "immediate", "fast"])
    with psycopg.connect(server.base, autocommit=True) as admin:
        admin.execute("CREATE DATABASE rel")
    dsn = server.dsn("rel")
    migrate.upgrade(dsn)
    conn = connect(dsn)
    make_docs(conn, "docs", rows)
    name = api_pipeline(conn, "docs")
    api.latency(API_LATENCY)
    fleet = Fleet(dsn, api_env(api), tmp_path)
    violations: list[tuple] = []

    def sample(c: psycopg.Connection) -> None:
        for pid, app, state, age, last in worker_backends(c):
            if state == "idle in transaction" and age is not None and age > IDLE_LIMIT:
                violations.append((pid, app, state, age, last))

    try:
        with sampling(dsn, 0.05, sample):
            workers = [fleet.start(batch_size=24, lease=20, poll=30) for _ in range(2)]
            wait_for(lambda: outbox_count(conn) < rows * 0.8, 60,
                     "the drain to be under way")
            conn.close()
            for mode in restarts:
                server.stop(mode)
                time.sleep(form.pick(1.5, 3.0))
                server.start()
                with connect(dsn) as probe:
                    wait_for(lambda probe=probe: len(worker_backends(probe)) >= 3, 60, "workers to reconnect")
            conn = connect(dsn)
            # every worker session, the LISTEN ones included, once each worker's pool (which
            # reconnects on its own schedule) is back too
            wait_for(lambda: sum(1 for b in worker_backends(conn) if b[1] == "pgembed-listener") == 2, 60,
                     "both listeners back")
            wait_for(lambda: sum(1 for b in worker_backends(conn) if b[1] == "pgembed-worker") >= 2, 60,
                     "the workers' pools back")
            terminated = scalar(conn, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                      f"WHERE {ROLE} IN ('pgembed-worker', 'pgembed-listener') "
                                      "AND datname = current_database()")
            assert terminated >= 4
            last_fault = time.monotonic()
            wait_for(lambda: sum(1 for b in worker_backends(conn) if b[1] == "pgembed-listener") == 2, 60,
                     "both listeners back after pg_terminate_backend")
            converge(conn, [body_expect(name, "docs")], timeout=120)
            # the probe: the poll interval is 30 s, so only a NOTIFY can bring this in quickly
            api.latency(0.0)
            probe_start = time.monotonic()
            conn.execute("INSERT INTO docs VALUES (%s, 'probe row after the restart')", (10**6,))
            wait_for(lambda: outbox_count(conn) == 0, 10,
                     "the probe row to be embedded through NOTIFY")
            probe_s = time.monotonic() - probe_start
            report = converge(conn, [body_expect(name, "docs")], api=api,
                              bound=lambda ideal: ideal + (len(restarts) + 2) * 2 * 2 * 24)
            converged = time.monotonic() - last_fault
        assert all(w.alive() for w in workers), "a worker died instead of reconnecting:\n" + fleet.logs()[-3000:]
        logs = fleet.logs()
        assert "Traceback" not in logs, logs[-3000:]
        assert "database unavailable" in logs or "reconnect" in logs.lower(), logs[-2000:]
        assert not violations, f"worker sessions idle in a transaction across an API call: {violations[:5]}"
        assert len(workers) == len(fleet.procs), "no worker had to be restarted"
    finally:
        fleet.stop_all()
        conn.close()
    results.add("2 PostgreSQL restart + terminated sessions", form.name,
                load=f"{rows} rows, 2 workers, API latency {API_LATENCY}s",
                faults=f"{len(restarts)} × server restart ({', '.join(restarts)}), "
                       f"{terminated} sessions terminated incl. LISTEN",
                inputs="distinct text per row",
                report=report, seconds=converged, probe_notify_s=round(probe_s, 2),
                idle_in_transaction_samples=len(violations))
