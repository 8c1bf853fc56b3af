"""How a worker is configured, refused at construction when a setting cannot work.

A bad value caught here is one sentence at start-up; caught later it is a worker that
spins on its poll, never renews a lease or waits forever on a shutdown. The CLI turns
ConfigError into its error message; library callers get it from WorkerConfig(...).

ScheduleConfig stays in pgembed/scheduler.py: it carries the scheduler's Job objects.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgembed.scheduler import ScheduleConfig


class ConfigError(ValueError):
    """A setting no worker can run with; the message names it and what is allowed."""


def _seconds(check: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda value: _is_number(value) and math.isfinite(value) and check(value)


def _count(least: int, most: int | None = None) -> Callable[[Any], bool]:
    return lambda value: _is_whole(value) and value >= least and (most is None or value <= most)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


BULK_FACTOR = 4  # bulk claims are this many times batch_size unless set (128 -> 512)

_POSITIVE = (_seconds(lambda v: v > 0), "greater than 0")
_NOT_NEGATIVE = (_seconds(lambda v: v >= 0), "0 or more")

# option -> (accepts, what is allowed). poll_interval must be > 0: at 0 an idle worker
# would claim in a loop as fast as the database answers.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "concurrency": (_count(1), "a whole number of at least 1"),
    "batch_size": (_count(1), "a whole number of at least 1"),
    "bulk_batch_size": (lambda v: v is None or _count(1)(v), "None or a whole number of at least 1"),
    "prefetch": (_count(0), "a whole number, 0 or more"),
    "lease_seconds": _POSITIVE,
    "poll_interval": _POSITIVE,
    "max_attempts": (_count(1), "a whole number of at least 1"),
    "retry_base": _NOT_NEGATIVE,
    "outage_backoff": _NOT_NEGATIVE,
    "shutdown_timeout": _NOT_NEGATIVE,
    "heartbeat_interval": _NOT_NEGATIVE,
    "until_empty_wait": _NOT_NEGATIVE,
    "dead_after": (lambda v: v is None or _seconds(lambda x: x > 0)(v), "None or greater than 0"),
    "metrics_port": (lambda v: v is None or _count(0, 65535)(v), "None or a port number from 0 to 65535"),
}


def _default_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class WorkerConfig:
    # embedding requests in flight at once: the one bound, for every provider of the worker
    # (an OpenAI provider's own PGEMBED_OPENAI_CONCURRENCY does not apply in a worker)
    concurrency: int = 2
    batch_size: int = 128  # rows per claim of changes made by the application
    # rows per claim while a backlog of bulk work (backfill, repair, migration) lasts: fewer,
    # larger statements and requests (a third more rows/s at 512); changes made by the
    # application keep the smaller batches, which come back sooner. None: BULK_FACTOR times
    # batch_size, so that --batch-size alone scales both; a number is used as it is.
    bulk_batch_size: int | None = None
    # batches claimed, read and looked up in the cache ahead, while the requests are out:
    # without them each request waits for its slot's database work, and an API-bound
    # worker reaches only latency / (latency + database time) of its bound
    prefetch: int = 1
    # for building a vector index put off during a large backfill (pgembed/indexes.py)
    index_memory: str = "1GB"
    lease_seconds: float = 300.0
    poll_interval: float = 5.0
    until_empty: bool = False
    max_attempts: int = 5
    retry_base: float = 10.0
    outage_backoff: float = 30.0
    name: str = field(default_factory=_default_name)
    # service
    shutdown_timeout: float = 30.0
    heartbeat_interval: float = 10.0  # 0: no pgembed.workers row
    # a worker whose heartbeat is older than this is dead: its leases are given back at once
    # (None: three heartbeat intervals, at least a second; see dead_after_seconds)
    dead_after: float | None = None
    # --until-empty: how long to wait for rows other workers hold before giving up (non-zero)
    until_empty_wait: float = 120.0
    handle_signals: bool = False  # SIGTERM/SIGINT -> graceful stop (the CLI sets it)
    schedule: ScheduleConfig | None = None  # None: no scheduled jobs in this worker
    metrics_port: int | None = None  # 0 picks a free port (tests)
    metrics_address: str = "127.0.0.1"

    @property
    def bulk_claim(self) -> int:
        """Rows per claim of bulk work: bulk_batch_size as given, else BULK_FACTOR × batch_size."""
        return self.bulk_batch_size if self.bulk_batch_size is not None else BULK_FACTOR * self.batch_size

    @property
    def dead_after_seconds(self) -> float:
        if self.dead_after is not None:
            return self.dead_after
        return max(3 * (self.heartbeat_interval or WorkerConfig.heartbeat_interval), 1.0)

    def __post_init__(self) -> None:
        for option, (accepts, allowed) in RULES.items():
            value = getattr(self, option)
            if not accepts(value):
                raise ConfigError(f"{option} must be {allowed}, not {value!r}")
