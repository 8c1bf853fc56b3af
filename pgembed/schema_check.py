"""The worker's first look at the database: is its pgembed schema the one this package knows?

A worker that started on another schema would fail mid-batch, or write what a newer schema
no longer means; migrate.check_revision says which, in one sentence.
"""

from __future__ import annotations

import psycopg

from pgembed import db, migrate


async def check_schema(dsn: str, worker: str) -> None:
    """Raises migrate.SchemaMismatch unless the schema is this package's.

    On a connection of its own, before the pool opens: the pool registers pgvector's types on
    every connection, which never succeeds where `pgembed init` never ran, so the pool would
    spend its whole timeout before saying anything. A server that does not answer is left to
    A server that does not answer, or a connection string that cannot work, stops the worker
    here, in one sentence, as `pgembed status` would: the pool would retry it for its whole
    timeout, warning all along and ending on a message that hides the cause. Once connected,
    the worker is patient: the queue and the pool reconnect across a restart."""
    db.remember_secrets(dsn)
    try:
        conn = await db.connect_async(dsn, "worker", worker)
    except psycopg.Error as error:
        raise db.DatabaseError(db.explain(error)) from None
    async with conn:
        try:
            found = await migrate.current_revision_async(conn)
        except psycopg.errors.InsufficientPrivilege as error:
            raise migrate.SchemaMismatch(
                f"cannot read the pgembed schema revision ({error.diag.message_primary}): make this "
                "worker's role a member of pgembed_worker (README: Privileges and roles)") from None
    migrate.check_revision(found)
