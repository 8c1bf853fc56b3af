"""The listener proves its session still hears by notifying itself: a session gone silent
(the network path drops everything, nothing is closed) is replaced by a new one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgembed.listener import Listener

NAME = "listen-test:1"
APP = f"pgembed-listener[{NAME}]"


class SilentProxy:
    """Forwards connections to the test server; `silence()` stops every connection open then
    from passing a byte either way, without closing it. Connections made later pass."""

    def __init__(self, conn: psycopg.Connection, directory: Path) -> None:
        self.host, self.port = conn.info.host, conn.info.port
        self.directory = directory
        self._silenced: list[asyncio.Event] = []  # one a connection: set once it is silenced
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    def dsn(self, dsn: str) -> str:
        return make_conninfo(dsn, host=str(self.directory), port=self.port)

    async def __aenter__(self) -> SilentProxy:
        self._server = await asyncio.start_unix_server(self._serve, self.directory / f".s.PGSQL.{self.port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def silence(self) -> None:
        for silenced in self._silenced:
            silenced.set()

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        if self.host.startswith("/"):
            server_in, server_out = await asyncio.open_unix_connection(f"{self.host}/.s.PGSQL.{self.port}")
        else:
            server_in, server_out = await asyncio.open_connection(self.host, self.port)
        silenced = asyncio.Event()
        self._silenced.append(silenced)
        for reader, writer in ((client_in, server_out), (server_in, client_out)):
            task = asyncio.create_task(self._pump(reader, writer, silenced))
            self._tasks.add(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, silenced: asyncio.Event) -> None:
        try:
            while data := await reader.read(65536):
                if silenced.is_set():
                    await asyncio.Event().wait()  # swallowed, and nothing more passes
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


async def _listener_pids(watcher: psycopg.AsyncConnection) -> list[int]:
    """The listener's sessions that have run their LISTEN."""
    cur = await watcher.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                                "AND datname = current_database() AND query <> ''", (APP,))
    return [pid for (pid,) in await cur.fetchall()]


async def _until(check: asyncio.Event, timeout: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(check.wait(), timeout)
    return check.is_set()


def test_a_listener_that_stops_hearing_its_own_probe_reconnects(conn: psycopg.Connection, dsn: str,
                                                                tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pgembed.listener")

    async def scenario() -> None:
        woken = asyncio.Event()
        async with SilentProxy(conn, tmp_path) as proxy, \
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watcher:
            listener = Listener(proxy.dsn(dsn), NAME, woken.set, probe_interval=0.1, probe_timeout=0.5)
            running = asyncio.create_task(listener.run())
            await asyncio.wait_for(listener.listening.wait(), 30)
            [first] = await _listener_pids(watcher)
            woken.clear()
            assert not await _until(woken, 1.0), "its probes (several by now) wake no one"
            await watcher.execute("NOTIFY pgembed, 'docs'")
            assert await _until(woken, 10), "work is heard"

            proxy.silence()
            for _ in range(300):
                if [pid for pid in await _listener_pids(watcher) if pid != first]:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("no new listener session after the first went silent")
            await asyncio.sleep(0.2)  # past the wake-up every new session starts with
            woken.clear()
            await watcher.execute("NOTIFY pgembed, 'docs'")
            assert await _until(woken, 10), "the new session hears"
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    asyncio.run(scenario())
    assert any("probe" in r.getMessage() and r.__dict__.get("action") == "listen_retry" for r in caplog.records)
