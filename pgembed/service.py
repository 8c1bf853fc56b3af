"""What makes the worker a well-behaved service: sd_notify and signals.

sd_notify is a datagram to $NOTIFY_SOCKET (a path, or an abstract socket when it starts
with '@'), so it needs no library: systemd learns READY=1 once the worker is connected and
listening, WATCHDOG=1 at half the watchdog interval, STOPPING=1 when it drains. Outside
systemd NOTIFY_SOCKET is unset and every call is a no-op.

The worker's `pgembed.workers` row is pgembed/heartbeat.py's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable

log = logging.getLogger("pgembed.service")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Notifier:
    """Sends sd_notify messages; silent when not started by systemd (or its look-alikes)."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    @classmethod
    def from_env(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram of `KEY=value` lines. Never raises: a lost notification must not
        stop the worker (systemd will notice through its own timeouts)."""
        if not self.address or not lines:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall("\n".join(lines).encode())
        except OSError as error:
            log.debug("sd_notify to %s failed: %s", self.address, error, extra={"action": "notify_failed"})
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC in seconds, as sd_watchdog_enabled(3) advises; None when the
    watchdog is off or meant for another process ($WATCHDOG_PID)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


async def watchdog_loop(notifier: Notifier, interval: float) -> None:
    """Pings while the event loop turns: a wedged loop stops the pings and systemd restarts
    the worker, which is the point."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def install_signal_handlers(loop: asyncio.AbstractEventLoop,
                            on_signal: Callable[[str], None]) -> Callable[[], None]:
    """SIGTERM and SIGINT call `on_signal(name)` in the loop; returns the undo function."""
    installed = []
    for sig in SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
            log.debug("cannot handle %s here", sig.name, extra={"action": "signals"})

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove

