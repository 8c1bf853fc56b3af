"""The worker's LISTEN session, which wakes its slots when work is queued."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg

from pgembed import db
from pgembed.sqlfiles import query

log = logging.getLogger("pgembed.listener")
CHANNEL = "pgembed"


class Listener:
    """LISTENs on a connection of its own; reconnects with backoff when it drops.
    `listening` is set once the first LISTEN is in place."""

    def __init__(self, dsn: str, worker: str, wake: Callable[[], None]) -> None:
        self.dsn = dsn
        self.worker = worker
        self.wake = wake
        self.listening = asyncio.Event()

    async def run(self) -> None:
        """The side task: listens until cancelled."""
        delay = 0.5
        while True:
            try:
                async with await db.connect_async(self.dsn, "listener", self.worker) as conn:
                    await conn.execute(query("listen"))
                    delay = 0.5
                    self.listening.set()
                    self.wake()  # anything sent while we were away
                    async for _ in conn.notifies():
                        self.wake()
            except psycopg.OperationalError as error:
                log.warning("listener lost its connection (%s); retrying in %.1fs", error, delay,
                            extra={"action": "listen_retry"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)
