"""Shared rate limits: one request and token budget per API key, kept in PostgreSQL.

An embedding API limits requests and tokens per minute per API key, not per process, so
every worker on every host spends from one budget: a row of `pgembed.rate_limits`, named by
a *bucket* derived from the API's base URL and a fingerprint of the key (the first 16 hex
digits of its sha256; the key itself never reaches the database)::

    key:3f2a9c1b7d4e5f60@https://api.openai.com/v1

Before each HTTP request (retries included) the provider calls `BucketLimiter.acquire`,
which calls `pgembed.take_budget` (one row lock, microseconds) and sleeps for as long as
it answers, then asks again. The guarantee, the pacing that spreads the budget out and the
rule for a request bigger than the whole budget (granted alone in its window, so never a
deadlock) are described at the top of `sql/ratelimit.sql`.

A bucket without a budget is not limited, and costs next to nothing: `take_budget` writes
nothing for it, and a limiter that found its bucket unlimited stops asking for
`UNLIMITED_RECHECK` seconds (5), so a budget set on a busy key applies within that long.
Budgets are set with `set_budget` (or `pgembed.set_rate_limit(...)` in SQL, or
`pgembed ratelimit set`) and shown by the `pgembed.rate_limit_status` view.
When PostgreSQL cannot be reached, `acquire` raises `RateLimitUnavailable`, a
`ProviderError`: the worker puts the batch back and tries later, as for an API outage.

A budget is spent up to its `headroom` (0.9: throttle at 90 %), and it learns: the provider
hands each answer's rate-limit headers to `BucketLimiter.observe`, which keeps the latest
and sends it with the next `take_budget` in the same statement (no round trip of its own),
to `pgembed.learn_rate_limit`; from then on every worker's grants also keep within what
the API said remains, until its reset (the rules are at the top of `sql/ratelimit.sql`).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from pgembed import db
from pgembed.providers.base import ModelSpec, ProviderError
from pgembed.sqlfiles import query

if TYPE_CHECKING:
    from pgembed.providers.openai import ApiLimits

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
#: Seconds a limiter takes a bucket it found without a budget to still have none.
UNLIMITED_RECHECK = 5.0
#: The share of a budget spent by default: throttle at 90 %.
DEFAULT_HEADROOM = 0.9

Sleep = Callable[[float], Awaitable[None]]


class InvalidBudget(ValueError):
    """A budget that cannot be enforced (zero, negative, not a number...)."""


class RateLimitUnavailable(ProviderError):
    """The shared budget could not be consulted: nothing may be sent, retry later."""


@dataclass(frozen=True)
class Budget:
    """At most `max_requests` requests and `max_tokens` tokens in any `per_seconds` window
    (None: that one is not limited), of which `burst_seconds` worth may go out at once;
    spent up to `headroom` of itself (the rest is a margin)."""

    max_requests: int | None = None
    max_tokens: int | None = None
    per_seconds: float = 60.0
    burst_seconds: float = 1.0
    headroom: float = DEFAULT_HEADROOM

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_tokens"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidBudget(f"{name} must be a whole number > 0 (or None for no limit), not {value!r}")
        if self.max_requests is not None and self.max_requests > 2**31 - 1:
            raise InvalidBudget(f"max_requests must be at most {2**31 - 1}, not {self.max_requests}")
        if self.max_tokens is not None and self.max_tokens > 2**63 - 1:
            raise InvalidBudget(f"max_tokens must be at most {2**63 - 1}, not {self.max_tokens}")
        if not _number(self.per_seconds) or not 0.1 <= self.per_seconds <= 86400:
            raise InvalidBudget(
                f"per_seconds must be between 0.1 and 86400, not {self.per_seconds!r} "
                "(a budget per minute has per_seconds=60)"
            )
        if not _number(self.burst_seconds) or not 0 < self.burst_seconds <= 86400:
            raise InvalidBudget(f"burst_seconds must be > 0 and at most 86400, not {self.burst_seconds!r}")
        if not _number(self.headroom) or not 0 < self.headroom <= 1:
            raise InvalidBudget(f"headroom must be > 0 and at most 1 (0.9: throttle at 90 %), not {self.headroom!r}")

    @classmethod
    def per_minute(cls, rpm: int | None, tpm: int | None, burst_seconds: float = 1.0,
                   headroom: float = DEFAULT_HEADROOM) -> Budget:
        """What an API's limits page says: requests and tokens per minute."""
        return cls(max_requests=rpm, max_tokens=tpm, per_seconds=60.0, burst_seconds=burst_seconds,
                   headroom=headroom)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------- buckets


def key_fingerprint(api_key: str) -> str:
    """16 hex digits of sha256(key): tells keys apart without revealing one."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


def normalise_base_url(base_url: str | None) -> str:
    """The API root as a bucket names it: no credentials, query or fragment, no final '/'."""
    url = (base_url or DEFAULT_OPENAI_BASE_URL).strip()
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        raise ValueError(f"not an absolute http(s) URL: {url!r}")
    host = parts.hostname.lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


def bucket_name(base_url: str | None, api_key: str) -> str:
    """The bucket every worker using this key against this API shares."""
    if not api_key:
        raise ValueError("a bucket needs the API key (any non-empty value for a server that needs none)")
    return f"key:{key_fingerprint(api_key)}@{normalise_base_url(base_url)}"


def openai_endpoint(api_key: str | None = None, base_url: str | None = None) -> tuple[str, str]:
    """(key, base URL) as `OpenAIProvider` resolves them: arguments, then the environment."""
    from pgembed.providers.openai import KEY_VARIABLES, URL_VARIABLES, _first_env

    key = api_key or _first_env(KEY_VARIABLES)
    if not key:
        raise ProviderError(f"no API key: set {KEY_VARIABLES[0]} or {KEY_VARIABLES[1]}")
    return key, normalise_base_url(base_url or _first_env(URL_VARIABLES))


def openai_bucket(api_key: str | None = None, base_url: str | None = None) -> str:
    """The bucket of the key and API that an `openai:` provider would use right now."""
    key, url = openai_endpoint(api_key, base_url)
    return bucket_name(url, key)


# ----------------------------------------------------------------- administration


def _set_params(bucket: str, budget: Budget, base_url: str | None, fingerprint: str | None) -> dict[str, Any]:
    return {
        "bucket": bucket,
        "max_requests": budget.max_requests,
        "max_tokens": budget.max_tokens,
        "per_seconds": float(budget.per_seconds),
        "burst_seconds": float(budget.burst_seconds),
        "base_url": base_url,
        "key_fingerprint": fingerprint,
        "headroom": float(budget.headroom),
    }


def set_budget(
    conn: psycopg.Connection,
    bucket: str,
    budget: Budget,
    *,
    base_url: str | None = None,
    key_fingerprint: str | None = None,
) -> None:
    """Create or change the budget of a bucket (takes effect at every worker's next request)."""
    conn.execute(query("rate_limit_set"), _set_params(bucket, budget, base_url, key_fingerprint))


def set_openai_budget(
    conn: psycopg.Connection, budget: Budget, *, api_key: str | None = None, base_url: str | None = None
) -> str:
    """Set the budget of the key and API in use (arguments, else environment); its bucket."""
    key, url = openai_endpoint(api_key, base_url)
    bucket = bucket_name(url, key)
    set_budget(conn, bucket, budget, base_url=url, key_fingerprint=key_fingerprint(key))
    return bucket


def clear_budget(conn: psycopg.Connection, bucket: str) -> bool:
    """Remove a budget (the bucket is then unlimited); False when there was none."""
    return conn.execute(query("rate_limit_clear"), {"bucket": bucket}).rowcount > 0


def is_limited(conn: psycopg.Connection, bucket: str) -> bool:
    """Whether the bucket has a budget. Only reads, so it is safe inside the caller's
    transaction (unlike `take_budget`, whose row lock would last as long as it)."""
    row = conn.execute(query("rate_limit_is_limited"), {"bucket": bucket}).fetchone()
    return bool(row and row[0])


def status(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every budget and what is being spent of it (`pgembed.rate_limit_status`)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("rate_limit_status")).fetchall()


# ---------------------------------------------------------------------- limiting


class RateLimits:
    """The budgets of one worker process: one connection of its own, opened on first use
    and reopened after a failure, shared by the limiter of every bucket (its session set up
    as pgembed.db's "ratelimit" role says, named after `worker` when one owns it).

    `max_sleep` caps one sleep, so that a raised budget is noticed within that long;
    `unlimited_recheck` is how long a bucket found without a budget is taken to have none
    (no query at all meanwhile), so that a new budget is noticed within that long;
    `sleep` replaces asyncio.sleep.
    """

    def __init__(
        self,
        dsn: str,
        *,
        worker: str | None = None,
        max_sleep: float = 5.0,
        unlimited_recheck: float = UNLIMITED_RECHECK,
        sleep: Sleep | None = None,
    ) -> None:
        self.dsn = dsn
        self.worker = worker
        self.max_sleep = max_sleep
        self.unlimited_recheck = unlimited_recheck
        self._sleep: Sleep = asyncio.sleep if sleep is None else sleep
        self._conn: psycopg.AsyncConnection | None = None
        self._opening = asyncio.Lock()
        self._limiters: dict[tuple[str, bool], BucketLimiter] = {}

    @classmethod
    def beside(cls, conn: psycopg.Connection, **options: Any) -> RateLimits:
        """Budgets on a connection of their own to the database `conn` is connected to, so
        that a grant's row lock never lasts as long as the caller's transaction."""
        dsn = conn.info.dsn
        if conn.info.password:  # never part of info.dsn
            dsn = make_conninfo(dsn, password=conn.info.password)
        return cls(dsn, **options)

    async def _connect(self) -> psycopg.AsyncConnection:
        return await db.connect_async(self.dsn, "ratelimit", self.worker, connect_timeout=10)

    def limiter(self, bucket: str, bulk: bool = False) -> BucketLimiter:
        """The limiter of a bucket (one per bucket, lane and process); `bulk`: for bulk
        requests, held to the bulk lane's share of the budget."""
        if (bucket, bulk) not in self._limiters:
            self._limiters[bucket, bulk] = BucketLimiter(self, bucket, bulk)
        return self._limiters[bucket, bulk]

    def for_spec(self, spec: ModelSpec, bulk: bool = False) -> BucketLimiter | None:
        """The limiter a provider for this model should use; None for providers that call
        no API (`local:`, `hash:`). Reads the key and base URL as the provider will."""
        if spec.provider != "openai":
            return None
        return self.limiter(openai_bucket(), bulk)

    async def ask(self, bucket: str, requests: int, tokens: int, bulk: bool = False,
                  seen: ApiLimits | None = None) -> tuple[float, bool]:
        """One `pgembed.take_budget`: 0 when granted, else seconds to wait; and whether the
        bucket has a budget at all (False: it grants anything). `seen`: what the API's
        headers said since the last ask, learnt first in the same statement."""
        for attempt in (1, 2):
            try:
                conn = await self._connection()
                # Shielded: a cancelled caller must not leave the connection mid-query (the
                # grant, if any, is then spent unused: never more than the budget).
                return await asyncio.shield(_take(conn, bucket, requests, tokens, bulk, seen))
            except psycopg.OperationalError as error:
                await self._discard()
                if attempt == 2:
                    raise RateLimitUnavailable(f"rate limit budget unavailable: {_first_line(error)}") from None
            except psycopg.errors.UndefinedFunction:
                raise RateLimitUnavailable(
                    "rate limit budget unavailable: pgembed.take_budget is missing (run `pgembed init`)"
                ) from None
            except psycopg.Error as error:
                raise RateLimitUnavailable(f"rate limit budget unavailable: {_first_line(error)}") from None
        raise AssertionError("unreachable")

    async def _connection(self) -> psycopg.AsyncConnection:
        async with self._opening:
            if self._conn is None or self._conn.closed:
                try:
                    self._conn = await self._connect()
                except psycopg.OperationalError as error:
                    raise RateLimitUnavailable(
                        f"rate limit budget unavailable: cannot connect to PostgreSQL: {_first_line(error)}"
                    ) from None
            return self._conn

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def aclose(self) -> None:
        await self._discard()

    async def __aenter__(self) -> RateLimits:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class BucketLimiter:
    """One bucket's budget, as a provider's `RateLimiter`."""

    def __init__(self, limits: RateLimits, bucket: str, bulk: bool = False) -> None:
        self.limits = limits
        self.bucket = bucket
        self.bulk = bulk
        self._unlimited_until = -math.inf
        self._seen: ApiLimits | None = None

    def observe(self, seen: ApiLimits) -> None:
        """What the API's rate-limit headers said in an answer: kept (the latest only, as
        the freshest) until the next ask carries it to the bucket's row."""
        self._seen = seen

    async def acquire(self, requests: int, tokens: int) -> None:
        """Return once the budget grants `requests` requests of `tokens` tokens in all."""
        if time.monotonic() < self._unlimited_until:
            # No budget a moment ago: a round trip per request would buy nothing.
            return
        while True:
            seen, self._seen = self._seen, None
            wait, limited = await self.limits.ask(self.bucket, requests, tokens, self.bulk, seen)
            if wait <= 0:
                if not limited:
                    self._unlimited_until = time.monotonic() + self.limits.unlimited_recheck
                return
            # A little jitter, so that waiters woken by the same slot do not all collide.
            await self.limits._sleep(min(wait, self.limits.max_sleep) + random.uniform(0, min(wait, 0.01)))

    def __repr__(self) -> str:
        return f"BucketLimiter({self.bucket!r}{', bulk' if self.bulk else ''})"


_NOTHING_SEEN = dict.fromkeys(("requests_limit", "requests_remaining", "requests_reset",
                               "tokens_limit", "tokens_remaining", "tokens_reset"))


async def _take(conn: psycopg.AsyncConnection, bucket: str, requests: int, tokens: int,
                bulk: bool = False, seen: ApiLimits | None = None) -> tuple[float, bool]:
    learnt = _NOTHING_SEEN if seen is None else asdict(seen)
    cur = await conn.execute(query("rate_limit_take_bulk" if bulk else "rate_limit_take"),
                             {"bucket": bucket, "requests": requests, "tokens": tokens, **learnt})
    row = await cur.fetchone()
    if row is None:
        return 0.0, True
    return (float(row[0]) if row[0] is not None else 0.0), bool(row[1])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
