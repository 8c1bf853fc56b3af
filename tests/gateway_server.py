"""A gateway served by uvicorn on a thread of the test process, on a free port, so that
tests talk to it with the real openai client over real HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette

from pgembed.gateway.app import create_app
from pgembed.gateway.settings import GatewaySettings

TOKEN = "gw-test-token"


@contextmanager
def running(app: Starlette) -> Iterator[str]:
    """The app served until the block ends; yields its base URL (ending in /v1)."""
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # every answer (headers, then body) waits some 40 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def gateway(dsn: str, **settings: Any) -> Iterator[str]:
    """A gateway on `dsn` with the test token (and `settings`' overrides)."""
    options: dict[str, Any] = {"tokens": (TOKEN,), "window_ms": 10.0}
    options.update(settings)
    with running(create_app(dsn, GatewaySettings(**options))) as url:
        yield url
