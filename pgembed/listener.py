"""The worker's LISTEN session, which wakes its slots when work is queued.

A session can die without a word: a network path that drops packets, a failover behind a
proxy that sends no reset. `notifies()` then waits forever and the worker, none the wiser,
falls back on its poll interval. So every PROBE_INTERVAL seconds the listener sends itself
a NOTIFY with a payload of its own (PROBE_PREFIX + a token) and takes an echo missing
PROBE_TIMEOUT seconds later for a dead session, which it replaces. Every worker hears every
probe on the shared channel; payloads with PROBE_PREFIX are not work, so they wake no one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable

import psycopg

from pgembed import db
from pgembed.sqlfiles import query

log = logging.getLogger("pgembed.listener")
CHANNEL = "pgembed"
PROBE_PREFIX = "pgembed-probe:"  # work is notified with a pipeline name (a table's) or ''
PROBE_INTERVAL = 30.0
PROBE_TIMEOUT = 10.0


class DeafListener(Exception):
    """The session no longer delivers what is sent to it."""


class Listener:
    """LISTENs on a connection of its own; reconnects with backoff when it drops or goes deaf.
    `listening` is set once the first LISTEN is in place."""

    def __init__(self, dsn: str, worker: str, wake: Callable[[], None], *,
                 probe_interval: float = PROBE_INTERVAL, probe_timeout: float = PROBE_TIMEOUT) -> None:
        self.dsn = dsn
        self.worker = worker
        self.wake = wake
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.listening = asyncio.Event()
        self._payload = PROBE_PREFIX + secrets.token_hex(8)
        self._echoed = False

    async def run(self) -> None:
        """The side task: listens until cancelled."""
        delay = 0.5
        while True:
            try:
                conn = await db.connect_async(self.dsn, "listener", self.worker)
                try:
                    await conn.execute(query("listen"))
                    delay = 0.5
                    self.listening.set()
                    self.wake()  # anything sent while we were away
                    await self._hear(conn)
                finally:
                    await conn.close()  # not `async with`: no ROLLBACK sent to a dead session
            except (psycopg.OperationalError, DeafListener) as error:
                log.warning("listener lost its connection (%s); retrying in %.1fs", error, delay,
                            extra={"action": "listen_retry"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)

    async def _hear(self, conn: psycopg.AsyncConnection) -> None:
        """Relays notifications for ever, a probe every interval."""
        while True:
            await self._relay(conn, self.probe_interval)
            await self._probe(conn)

    async def _probe(self, conn: psycopg.AsyncConnection) -> None:
        """Notifies itself; raises DeafListener unless the echo is back within the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.probe_timeout
        self._echoed = False
        try:
            await asyncio.wait_for(conn.execute(query("listener_probe"), {"payload": self._payload}),
                                   self.probe_timeout)
        except TimeoutError:
            raise DeafListener(f"its probe got no answer within {self.probe_timeout:g}s") from None
        while not self._echoed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeafListener(f"its probe was not echoed within {self.probe_timeout:g}s")
            await self._relay(conn, remaining, stop_after=1)

    async def _relay(self, conn: psycopg.AsyncConnection, seconds: float, stop_after: int | None = None) -> None:
        """Wakes the worker on each notification of work for `seconds` (or `stop_after` of any)."""
        pid = conn.info.backend_pid
        async for notify in conn.notifies(timeout=seconds, stop_after=stop_after):
            if notify.payload == self._payload and notify.pid == pid:
                self._echoed = True
            elif not notify.payload.startswith(PROBE_PREFIX):
                self.wake()
