"""Rate limits with headroom that learn (issue 15): a budget is spent up to its headroom,
and the provider's rate-limit headers (OpenAI's x-ratelimit-*) slow every worker down when
the API says fewer remain than the budget thinks, so that a budget set too high still
avoids 429s. Counts only: 429s from the fake's stats, grants from the database."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg
import pytest

from pgembed import ratelimit
from pgembed.providers.openai import ApiLimits, parse_reset
from pgembed.ratelimit import Budget, InvalidBudget, RateLimits
from tests.fakeapi import FakeAPI
from tests.test_cli import cli
from tests.test_ratelimit import KEY, provider, take


def learn(conn: psycopg.Connection, bucket: str, **said: Any) -> bool:
    seen = {"requests_limit": None, "requests_remaining": None, "requests_reset": None,
            "tokens_limit": None, "tokens_remaining": None, "tokens_reset": None, **said}
    row = conn.execute("SELECT pgembed.learn_rate_limit(%(b)s, %(requests_limit)s, %(requests_remaining)s, "
                       "%(requests_reset)s, %(tokens_limit)s, %(tokens_remaining)s, %(tokens_reset)s)",
                       {"b": bucket, **seen}).fetchone()
    assert row is not None
    return bool(row[0])


def grants(conn: psycopg.Connection, bucket: str, n: int, tokens: int = 0) -> list[bool]:
    return [take(conn, bucket, 1, tokens) == 0 for _ in range(n)]


# ------------------------------------------------------------------ the headers


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("59.801s", 59.801),
    ("300us", 0.0003), (" 2s ", 2.0),
    ("soon", None), ("-1s", None), ("1x", None), ("", None), ("1s junk", None), ("nan", None), ("inf", None),
])
def test_reset_headers_are_read_as_openai_writes_them(text: str, seconds: float | None) -> None:
    assert parse_reset(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_headers_that_say_nothing_readable_teach_nothing() -> None:
    assert ApiLimits.from_headers({}) is None
    assert ApiLimits.from_headers({"x-ratelimit-remaining-requests": "lots"}) is None
    assert ApiLimits.from_headers({"x-ratelimit-remaining-requests": "²"}) is None
    seen = ApiLimits.from_headers({"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "2999",
                                   "x-ratelimit-reset-requests": "20ms", "x-ratelimit-remaining-tokens": "-4",
                                   "x-ratelimit-limit-tokens": "1000000", "x-ratelimit-reset-tokens": "6m0s"})
    assert seen == ApiLimits(3000, 2999, pytest.approx(0.02), 1_000_000, None, 360.0)


# ------------------------------------------------------------------ headroom


def test_a_budget_is_spent_up_to_its_headroom(conn: psycopg.Connection) -> None:
    ratelimit.set_budget(conn, "h", Budget(max_requests=10, per_seconds=60, burst_seconds=60))
    assert grants(conn, "h", 10) == [True] * 9 + [False], "90 % of 10 by default"
    ratelimit.set_budget(conn, "h", Budget(max_requests=10, per_seconds=60, burst_seconds=60, headroom=1))
    assert grants(conn, "h", 2) == [True, False], "all of it at headroom 1"
    # a budget set in SQL without a headroom keeps the one it has
    conn.execute("SELECT pgembed.set_rate_limit('h', 20, NULL, 60, 60)")
    assert [r["headroom"] for r in ratelimit.status(conn)] == [1.0]
    # one request a minute at 0.9 is still one request, not none
    ratelimit.set_budget(conn, "one", Budget(max_requests=1, per_seconds=60, burst_seconds=60))
    assert grants(conn, "one", 2) == [True, False]


@pytest.mark.parametrize("headroom", [0, -0.5, 1.5, float("nan")])
def test_a_headroom_outside_0_to_1_is_refused(conn: psycopg.Connection, headroom: float) -> None:
    with pytest.raises(InvalidBudget, match="headroom must be > 0 and at most 1"):
        Budget(max_requests=10, headroom=headroom)
    with pytest.raises(psycopg.Error, match="headroom must be > 0 and <= 1"):
        conn.execute("SELECT pgembed.set_rate_limit('b', 10, NULL, 60, 1, NULL, NULL, %s)", (headroom,))
    assert conn.execute("SELECT count(*) FROM pgembed.rate_limits").fetchone() == (0,)


# ------------------------------------------------------------------ learning, in SQL


def test_what_the_api_says_remains_holds_every_grant_until_its_reset(conn: psycopg.Connection) -> None:
    ratelimit.set_budget(conn, "l", Budget(max_requests=1000, per_seconds=60, burst_seconds=60))
    assert not learn(conn, "l", requests_limit=10, requests_remaining=3), "no grant yet: nothing to learn"
    assert grants(conn, "l", 1) == [True]
    assert learn(conn, "l", requests_limit=10, requests_remaining=3, requests_reset=30)
    # 3 remain; a reserve of (1 - 0.9) × 10 = 1 is kept: 2 more, then a wait for the reset
    assert grants(conn, "l", 2) == [True, True]
    wait = take(conn, "l")
    assert 25 < wait <= 30
    [row] = ratelimit.status(conn)
    assert (row["api_requests_limit"], row["api_requests_remaining"], row["api_seen_at"] is not None) == (10, 1, True)
    # an answer more hopeful than what the bucket thinks (an older request answered late) is ignored...
    assert not learn(conn, "l", requests_limit=10, requests_remaining=8, requests_reset=30)
    assert take(conn, "l") > 0
    # ...a bleaker one is kept, and a reset that has come frees the bucket again
    assert learn(conn, "l", requests_limit=10, requests_remaining=0, requests_reset=0.2)
    assert take(conn, "l") > 0
    time.sleep(0.3)
    assert grants(conn, "l", 3) == [True] * 3
    assert ratelimit.status(conn)[0]["api_requests_remaining"] is None, "nothing learnt holds past its reset"


def test_tokens_are_learnt_even_where_the_budget_does_not_limit_them(conn: psycopg.Connection) -> None:
    ratelimit.set_budget(conn, "t", Budget(max_requests=1000, per_seconds=60, burst_seconds=60))
    assert grants(conn, "t", 1, 10) == [True]
    assert learn(conn, "t", tokens_limit=1000, tokens_remaining=350, tokens_reset=30)
    # 350 remain, 100 kept in reserve: 250 may go
    assert grants(conn, "t", 3, 100) == [True, True, False]
    assert grants(conn, "t", 1, 50) == [True]
    assert grants(conn, "t", 1, 0) == [True], "a request of no tokens is not held by tokens"


def test_learning_needs_a_budget_and_sane_numbers(conn: psycopg.Connection) -> None:
    assert not learn(conn, "nobody", requests_remaining=0, requests_reset=60)
    assert conn.execute("SELECT count(*) FROM pgembed.rate_limit_state").fetchone() == (0,)
    assert take(conn, "nobody") == 0, "an unlimited bucket stays unlimited"
    for bad in ({"requests_remaining": -1}, {"tokens_limit": -5, "tokens_remaining": 1},
                {"requests_remaining": 1, "requests_reset": float("nan")},
                {"requests_remaining": 1, "requests_reset": float("inf")}):
        with pytest.raises(psycopg.Error, match="rate-limit headers must be numbers >= 0"):
            learn(conn, "nobody", **bad)


# ------------------------------------------------------------- end to end, 429s


TRUE_LIMIT = 40   # requests per window at the fake API
WINDOW = 2.0      # seconds
CALLS = 120


def run_against_true_limit(dsn: str, conn: psycopg.Connection, headers: bool) -> dict[str, Any]:
    """CALLS single-text embeddings through a budget set at 2× the fake's true limit, by two
    "workers": each its own limiter and connection, sharing the bucket's row."""
    with FakeAPI(dimensions={"tiny": 8}) as api:
        api.rate_limit(requests=TRUE_LIMIT, window=WINDOW, headers=headers)
        bucket = ratelimit.bucket_name(api.base_url, KEY)
        ratelimit.set_budget(conn, bucket, Budget(max_requests=2 * TRUE_LIMIT, per_seconds=WINDOW,
                                                  burst_seconds=WINDOW / 2))

        async def worker(first: int) -> list[Any]:
            async with RateLimits(dsn) as limits:
                p = provider(api, limits.limiter(bucket), concurrency=2, max_attempts=40,
                             backoff_base=0.02, backoff_max=0.1)
                async with p:
                    return await asyncio.gather(*(p.embed([f"text {i}"]) for i in range(first, CALLS, 2)))

        async def go() -> list[Any]:
            return [r for rs in await asyncio.gather(worker(0), worker(1)) for r in rs]

        results = asyncio.run(go())
        assert len(results) == CALLS
        assert all(r.errors == [None] for r in results), "every call embedded in the end"
        stats = api.stats()
    [status] = [r for r in ratelimit.status(conn) if r["bucket"] == bucket]
    ratelimit.clear_budget(conn, bucket)
    return {"429": stats["statuses"].get("429", 0), "200": stats["statuses"].get("200", 0), "status": status}


def test_a_budget_set_too_high_learns_the_true_limit_from_the_headers_and_avoids_429s(
    dsn: str, conn: psycopg.Connection
) -> None:
    blind = run_against_true_limit(dsn, conn, headers=False)
    learning = run_against_true_limit(dsn, conn, headers=True)
    assert blind["200"] == learning["200"] == CALLS
    assert blind["429"] >= 20, blind
    assert learning["429"] <= 2, learning
    assert learning["status"]["api_requests_limit"] == TRUE_LIMIT
    assert blind["status"]["api_requests_limit"] is None, "nothing to learn without the headers"


def test_the_command_line_sets_a_headroom_and_shows_what_was_learnt(dsn: str, conn: psycopg.Connection) -> None:
    done = cli("ratelimit", "set", "--requests-per-minute", "100", "--headroom", "0.8", "--bucket", "b",
               "--dsn", dsn)
    assert done.exit_code == 0, done.output
    assert "spent up to 80%" in done.output
    assert grants(conn, "b", 1) == [True]
    assert learn(conn, "b", requests_limit=60, requests_remaining=42, requests_reset=30)
    shown = cli("ratelimit", "show", "--dsn", dsn)
    assert shown.exit_code == 0, shown.output
    assert "spent up to 80%" in shown.output and "42 of 60" in shown.output
    [row] = json.loads(cli("ratelimit", "show", "--json", "--dsn", dsn).output)["budgets"]
    assert (row["headroom"], row["api_requests_limit"], row["api_requests_remaining"]) == (0.8, 60, 42)
    for bad in ("0", "1.5", "x"):
        failed = cli("ratelimit", "set", "--requests-per-minute", "100", "--headroom", bad, "--bucket", "b",
                     "--dsn", dsn)
        assert failed.exit_code == 2, (bad, failed.output)
    assert ratelimit.status(conn)[0]["headroom"] == 0.8, "a refused change changes nothing"


def test_the_fake_api_s_limit_set_again_starts_from_nothing():
    """Each limit the fake API is given counts from zero: the same numbers twice (two tests,
    or two phases of one) are two limits, not one shared counter."""
    api = FakeAPI()
    request = {"model": "text-embedding-3-small", "input": "a"}
    statuses = []
    for _ in range(2):
        api.rate_limit(requests=1, window=60)
        statuses += [api.handle_embeddings(request, "Bearer sk-test")[0] for _ in range(2)]
    assert statuses == [200, 429, 200, 429]
