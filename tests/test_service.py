"""The worker as a service: signals, sd_notify, the heartbeat row, the systemd unit, JSON
logs and metrics. Acceptance tests run the real `pgembed worker` as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgembed import pipelines
from pgembed.cli.common import EXIT_SCHEMA_MISMATCH
from pgembed.service import Notifier
from pgembed.worker import Worker, WorkerConfig
from tests.conftest import drain

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "pgembed-worker.service"
MODEL = "openai:text-embedding-3-small"
SMALL = pipelines.PipelineOptions(dimensions=64)
DEST = "docs_te3s_64"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Polls a condition on rows or processes (never a fixed sleep); fails with `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def count(conn: psycopg.Connection, query: str, *params: Any) -> int:
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row else 0


def leased(conn: psycopg.Connection) -> int:
    return count(conn, "SELECT count(*) FROM pgembed.outbox WHERE lease_id IS NOT NULL AND available_at > now()")


def backlog(conn: psycopg.Connection, rows: int, model: str = MODEL,
            options: pipelines.PipelineOptions = SMALL) -> str:
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs SELECT g, 'document number ' || g FROM generate_series(1, %s) g", (rows,))
    return pipelines.create(conn, "docs", "body", model, options)


def spawn(dsn: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`pgembed worker` in a process of its own; output goes to files (a full pipe would block it)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    environment.update(env or {})
    with (tmp_path / "stdout").open("wb") as out, (tmp_path / "stderr").open("wb") as err:
        return subprocess.Popen([sys.executable, "-m", "pgembed", "worker", "--dsn", dsn, *args],
                                stdout=out, stderr=err, env=environment, cwd=ROOT)


def output(tmp_path: Path) -> tuple[str, str]:
    return (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


def finish(proc: subprocess.Popen[bytes], tmp_path: Path, timeout: float = 60.0) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"worker did not exit within {timeout}s; stderr:\n{output(tmp_path)[1][-3000:]}")


def test_sigterm_during_a_busy_drain_exits_cleanly_and_loses_nothing(conn, dsn, fake_api, tmp_path):
    backlog(conn, 400)
    fake_api.latency(0.2)
    proc = spawn(dsn, tmp_path, "--batch-size", "10", "--bulk-batch-size", "10",
                 "--concurrency", "2", "--shutdown-timeout", "30",
                 "--no-scheduler", "-v")
    wait_for(lambda: count(conn, f"SELECT count(*) FROM pgembed.{DEST}") >= 40, "some batches done")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, tmp_path) == 0, output(tmp_path)[1][-3000:]
    assert leased(conn) == 0, "every lease was acknowledged or given back"
    left = count(conn, "SELECT count(*) FROM pgembed.outbox")
    assert left > 0, "SIGTERM arrived mid-drain"
    assert "rows embedded" in output(tmp_path)[0]

    fake_api.latency(0)
    drain(dsn, batch_size=50)
    rows = conn.execute(f"SELECT d.body = e.chunk FROM docs d JOIN pgembed.{DEST} e USING (id)").fetchall()
    assert len(rows) == 400 and all(ok for (ok,) in rows), "a second worker finished the rest"
    assert count(conn, "SELECT count(*) FROM pgembed.outbox") == 0
    assert count(conn, "SELECT count(*) FROM pgembed.workers") == 0


def test_shutdown_bound_gives_unfinished_batches_back_at_once(conn, dsn, fake_api, tmp_path):
    backlog(conn, 30)
    fake_api.latency(120)  # the embedding call will not finish by itself
    proc = spawn(dsn, tmp_path, "--batch-size", "10", "--bulk-batch-size", "10",
                 "--concurrency", "2", "--shutdown-timeout", "1",
                 "--no-scheduler", "--log-format", "json", "-v", env={"PGEMBED_OPENAI_TIMEOUT": "300"})
    wait_for(lambda: fake_api.in_flight >= 2, "two embedding requests under way")
    wait_for(lambda: leased(conn) == 30, "the third batch read ahead (--prefetch 1)")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, tmp_path) == 0, output(tmp_path)[1][-3000:]
    assert leased(conn) == 0
    assert count(conn, "SELECT count(*) FROM pgembed.outbox WHERE available_at <= now()") == 30, \
        "given back for another worker to take now, not when the lease expires"
    actions = [json.loads(line)["action"] for line in output(tmp_path)[1].splitlines() if line.strip()]
    assert "shutdown_timeout" in actions and actions.count("release") == 3

    fake_api.latency(0)
    drain(dsn)
    assert count(conn, f"SELECT count(*) FROM pgembed.{DEST}") == 30


def test_systemd_hears_ready_watchdog_and_stopping_and_the_heartbeat_row_comes_and_goes(conn, dsn, tmp_path):
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(60)
        proc = spawn(dsn, tmp_path, "--no-scheduler", "--name", "svc-test", "--heartbeat-interval", "0.2",
                     env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
        messages: list[str] = []

        def receive_until(line: str) -> None:
            while not any(line in m.splitlines() for m in messages):
                try:
                    messages.append(sock.recv(4096).decode())
                except TimeoutError:
                    proc.kill()
                    pytest.fail(f"no {line} in {messages}; stderr: {output(tmp_path)[1][-2000:]}")

        receive_until("READY=1")
        row = conn.execute("SELECT pid, state, host FROM pgembed.workers WHERE name = 'svc-test'").fetchone()
        assert row == (proc.pid, "running", socket.gethostname()), "the heartbeat row exists once READY"
        assert count(conn, "SELECT count(*) FROM pg_stat_activity "
                           "WHERE application_name = 'pgembed-worker[svc-test]'") >= 1
        first_seen = conn.execute("SELECT last_seen FROM pgembed.workers").fetchone()[0]
        wait_for(lambda: conn.execute("SELECT last_seen FROM pgembed.workers").fetchone()[0] > first_seen,
                 "a second heartbeat")
        receive_until("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert finish(proc, tmp_path) == 0
    assert count(conn, "SELECT count(*) FROM pgembed.workers") == 0, "a clean exit removes the row"
    assert any(m.startswith("READY=1") and "STATUS=" in m for m in messages)


def test_notifier_reaches_an_abstract_socket_and_is_silent_without_one():
    name = f"pgembed-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier("@" + name).stopping("bye")
        assert sock.recv(1024) == b"STOPPING=1\nSTATUS=bye"
    assert not Notifier(None).ready("ready")
    assert not Notifier("/nonexistent/notify.sock").ready("ready"), "a lost notification never raises"


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    pgembed = Path(sys.executable).with_name("pgembed")
    assert pgembed.exists(), "the pgembed console script is installed next to this python"
    text = UNIT.read_text()
    assert re.search(r"^ExecStart=/usr/local/bin/pgembed worker$", text, re.MULTILINE)
    # verify checks that ExecStart exists: point a copy at this environment's script
    unit = tmp_path / "pgembed-worker.service"
    unit.write_text(text.replace("/usr/local/bin/pgembed", str(pgembed)))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=120)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "pgembed-worker" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    for setting in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure",
                    "EnvironmentFile=/etc/pgembed/pgembed.env", "KillSignal=SIGTERM", "NoNewPrivileges=yes",
                    "ProtectSystem=strict", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "MemoryMax="):
        assert setting in text
    assert f"RestartPreventExitStatus={EXIT_SCHEMA_MISMATCH}" in text, "no restarts on a schema mismatch"
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.MULTILINE).group(1))
    assert stop > 30, "systemd waits longer than the worker's default shutdown bound"


def test_json_logs_parse_and_every_record_has_an_action(conn, dsn, tmp_path):
    backlog(conn, 20, "hash:16", pipelines.PipelineOptions())
    proc = spawn(dsn, tmp_path, "--until-empty", "--log-format", "json", "-v", "--batch-size", "5")
    assert finish(proc, tmp_path) == 0
    records = [json.loads(line) for line in output(tmp_path)[1].splitlines() if line.strip()]
    assert records and all(r["action"] and {"ts", "level", "message"} <= set(r) for r in records)
    actions = {r["action"] for r in records}
    assert {"start", "batch", "stop"} <= actions
    batch = next(r for r in records if r["action"] == "batch")
    assert batch["pipeline"] == "docs_h16" and batch["written"] == 5


def test_metrics_endpoint_reports_rows_latency_cache_and_queue(conn, dsn):
    pytest.importorskip("prometheus_client")
    name = backlog(conn, 30, "hash:16", pipelines.PipelineOptions())

    async def scenario() -> str:
        worker = Worker(dsn, WorkerConfig(metrics_port=0, heartbeat_interval=0.1, poll_interval=0.1,
                                          batch_size=10))
        task = asyncio.create_task(worker.run())
        while worker.stats.written < 30 or worker.metrics_port is None:
            await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        deadline = time.monotonic() + 60
        while True:  # the heartbeat refreshes the queue depth after the last batch
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
            if 'pgembed_queue_depth{state="ready"} 0.0' in body or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        worker.stop()
        await task
        return body

    body = asyncio.run(scenario())
    assert f'pgembed_rows_total{{outcome="written",pipeline="{name}"}} 30.0' in body
    assert f'pgembed_batches_total{{pipeline="{name}"}} 3.0' in body
    assert 'pgembed_api_request_seconds_count{model="hash:16"} 3.0' in body
    assert 'pgembed_cache_misses_total{model="hash:16"} 30.0' in body
    assert 'pgembed_cache_hits_total{model="hash:16"} 0.0' in body
    assert 'pgembed_queue_depth{state="ready"} 0.0' in body
    assert 'pgembed_tokens_total{model="hash:16"}' in body


def test_stop_while_claiming_leaves_no_lease_behind(conn, dsn):
    """In-process: stop() between claims; the heartbeat row appears and goes."""
    backlog(conn, 200, "hash:16", pipelines.PipelineOptions())
    seen: list[int] = []

    async def scenario() -> None:
        worker = Worker(dsn, WorkerConfig(batch_size=5, concurrency=3, heartbeat_interval=60))

        def after_batch(_: object) -> None:
            if not seen:
                seen.append(count(conn, "SELECT count(*) FROM pgembed.workers"))
                worker.stop()

        worker.on_batch = after_batch
        await worker.run()

    asyncio.run(scenario())
    assert seen == [1]
    assert leased(conn) == 0
    assert count(conn, "SELECT count(*) FROM pgembed.workers") == 0
    drain(dsn)
    assert count(conn, "SELECT count(*) FROM pgembed.docs_h16") == 200
