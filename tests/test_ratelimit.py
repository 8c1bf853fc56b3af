"""The shared rate limit: budgets in PostgreSQL, spent by many clients at once.

The budgets here are per second (`per_seconds=1`) rather than per minute, so that a run of
a few seconds crosses many windows. The load test checks two things:

* exactly, what the database granted: a trigger of the test's own logs the time at which
  `take_budget` decided each grant, and no window of `per_seconds` may hold more than the
  budget;
* end to end, what the API received: `TimedAPI` stamps every request as it arrives (one
  clock for every client, processes included). A request arrives a little after its grant,
  so these windows may hold the budget plus what was granted during that delay: at most
  the pacer's burst plus LATENCY seconds' worth.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgembed import pipelines, ratelimit
from pgembed.providers import make_provider
from pgembed.providers.base import ModelSpec, ProviderError
from pgembed.providers.openai import OpenAIProvider
from pgembed.ratelimit import BucketLimiter, Budget, InvalidBudget, RateLimits, RateLimitUnavailable
from pgembed.search import search
from tests.conftest import drain
from tests.fakeapi import FakeAPI, fake_token_count
from tests.test_cli import cli

KEY = "sk-test-ratelimit-9Zq7SECRETkeyMaterial4242"
SPEC = ModelSpec("openai:tiny", dimensions=8, native_dimensions=8, max_batch_inputs=3)
REPO = Path(__file__).resolve().parent.parent

# The load test: budgets per second, and how the checks allow for latency.
WINDOW = 1.0
MAX_REQUESTS = 30
MAX_TOKENS = 650
BURST = 0.2
RUN_SECONDS = 4.0
# How long a request may take from its grant to its arrival at the API, on a loaded machine.
LATENCY = 0.3


class TimedAPI(FakeAPI):
    """The fake API, plus the arrival time and billed tokens of every request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.arrivals: list[tuple[float, int]] = []
        self._arrivals_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def handle_embeddings(self, body: Any, auth: str | None) -> tuple[int, dict[str, str], bytes]:
        stamp = time.time()
        texts = body.get("input") if isinstance(body, dict) else None
        if isinstance(texts, list):
            with self._arrivals_lock:
                self.arrivals.append((stamp, sum(fake_token_count(t) for t in texts if isinstance(t, str))))
        return super().handle_embeddings(body, auth)


@pytest.fixture
def api() -> Iterator[TimedAPI]:
    with TimedAPI(dimensions={"tiny": 8}) as server:
        yield server


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("PGEMBED_OPENAI_", "OPENAI_")):
            monkeypatch.delenv(name)


def provider(api: FakeAPI, limiter: Any = None, **options: Any) -> OpenAIProvider:
    settings: dict[str, Any] = {
        "api_key": KEY,
        "base_url": api.base_url,
        "timeout": 5.0,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "token_counter": fake_token_count,
        "limiter": limiter,
    }
    settings.update(options)
    return OpenAIProvider(SPEC, **settings)


def take(conn: psycopg.Connection, bucket: str, requests: int = 1, tokens: int = 0) -> float:
    row = conn.execute("SELECT pgembed.take_budget(%s, %s, %s)", (bucket, requests, tokens)).fetchone()
    assert row is not None
    return row[0]


def heaviest_window(events: list[tuple[float, int]], width: float) -> tuple[int, int]:
    """The most requests, and the most tokens, that arrived within any `width` seconds."""
    events = sorted(events)
    most_requests = most_tokens = 0
    end = tokens = 0
    for start, (t0, _) in enumerate(events):
        while end < len(events) and events[end][0] < t0 + width:
            tokens += events[end][1]
            end += 1
        most_requests = max(most_requests, end - start)
        most_tokens = max(most_tokens, tokens)
        tokens -= events[start][1]
    return most_requests, most_tokens


# ----------------------------------------------------------------- bucket names


def test_a_bucket_is_named_by_url_and_key_fingerprint_never_the_key() -> None:
    bucket = ratelimit.bucket_name("https://API.example.com/v1/", KEY)
    assert bucket == f"key:{ratelimit.key_fingerprint(KEY)}@https://api.example.com/v1"
    assert KEY not in bucket and len(ratelimit.key_fingerprint(KEY)) == 16
    # the same key on the same API is one bucket, however the URL is written
    assert ratelimit.bucket_name("https://api.example.com/v1", KEY) == bucket
    assert ratelimit.bucket_name("https://api.example.com/v1", KEY + "x") != bucket
    assert ratelimit.bucket_name("https://other.example.com/v1", KEY) != bucket
    # credentials, queries and fragments in a base URL never reach the bucket
    leaky = ratelimit.bucket_name("https://user:hunter2@api.example.com:8443/v1?api-key=hunter2#x", KEY)
    assert "hunter2" not in leaky and leaky.endswith("@https://api.example.com:8443/v1")
    # no base URL: OpenAI's, as the provider would use
    assert ratelimit.bucket_name(None, KEY).endswith("@https://api.openai.com/v1")


def test_the_bucket_of_a_spec_follows_the_providers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGEMBED_OPENAI_API_KEY", KEY)
    monkeypatch.setenv("PGEMBED_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    limits = RateLimits("dbname=unused")
    limiter = limits.for_spec(SPEC)
    assert isinstance(limiter, BucketLimiter)
    assert limiter.bucket == ratelimit.bucket_name("http://127.0.0.1:9/v1", KEY)
    assert limits.for_spec(ModelSpec("openai:other", 8, 8)) is limiter  # one budget per key
    assert limits.for_spec(ModelSpec("hash:8", 8, 8)) is None
    assert limits.for_spec(ModelSpec("local:all-MiniLM-L6-v2", 384, 384)) is None


# ---------------------------------------------------------------------- budgets
# (headroom=1 where a test counts the mechanics exactly: headroom has its own tests)


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"max_requests": 0}, "max_requests must be a whole number > 0"),
        ({"max_tokens": -5}, "max_tokens must be a whole number > 0"),
        ({"max_tokens": 1.5}, "max_tokens must be a whole number > 0"),
        ({"max_requests": True}, "max_requests must be a whole number > 0"),
        ({"max_requests": 10, "per_seconds": 0}, "per_seconds must be between 0.1 and 86400"),
        ({"max_requests": 10, "per_seconds": math.nan}, "per_seconds must be between 0.1 and 86400"),
        ({"max_requests": 10, "burst_seconds": 0}, "burst_seconds must be > 0"),
        ({"max_requests": 10, "burst_seconds": math.inf}, "burst_seconds must be > 0"),
    ],
)
def test_invalid_budgets_are_refused_in_python(budget: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidBudget, match=message):
        Budget(**budget)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("SELECT pgembed.set_rate_limit('b', 0, NULL)", "max_requests must be > 0, not 0"),
        ("SELECT pgembed.set_rate_limit('b', NULL, -1)", "max_tokens must be > 0, not -1"),
        ("SELECT pgembed.set_rate_limit('b', 10, NULL, 0)", "per_seconds must be 0.1 to 86400, not 0"),
        ("SELECT pgembed.set_rate_limit('b', 10, NULL, 'NaN')", "per_seconds must be 0.1 to 86400, not NaN"),
        ("SELECT pgembed.set_rate_limit('b', 10, NULL, 60, -1)", "burst_seconds must be > 0, not -1"),
        ("SELECT pgembed.set_rate_limit('b', 10, NULL, 60, 1, NULL, 'sk-abc')", "never store the key itself"),
        ("INSERT INTO pgembed.rate_limits (bucket, max_tokens) VALUES ('b', 0)", "max_tokens must be > 0 or NULL"),
        ("INSERT INTO pgembed.rate_limits (bucket, per_seconds) VALUES ('b', 0)", "per_seconds must be 0.1 to 86400"),
        ("SELECT pgembed.take_budget('b', -1, 0)", "needs requests >= 0 and tokens >= 0"),
    ],
)
def test_invalid_budgets_are_refused_in_sql(conn: psycopg.Connection, call: str, message: str) -> None:
    with pytest.raises(psycopg.Error, match=message):
        conn.execute(call)
    assert conn.execute("SELECT count(*) FROM pgembed.rate_limits").fetchone() == (0,)


def test_an_unlimited_bucket_grants_everything_and_writes_nothing(conn: psycopg.Connection) -> None:
    assert take(conn, "nobody", 1, 10**9) == 0
    ratelimit.set_budget(conn, "open", Budget())  # both None: a bucket on record, not limited
    assert all(take(conn, "open", 1, 10**6) == 0 for _ in range(50))
    assert conn.execute("SELECT count(*) FROM pgembed.rate_limit_state").fetchone() == (0,)


def test_a_window_grants_its_budget_then_says_how_long_to_wait(conn: psycopg.Connection) -> None:
    ratelimit.set_budget(conn, "b", Budget(max_requests=5, max_tokens=1000, per_seconds=1, burst_seconds=1, headroom=1))
    assert [take(conn, "b", 1, 10) for _ in range(5)] == [0] * 5
    wait = take(conn, "b", 1, 10)
    assert 0 < wait <= 1.0 + 1 / 60
    [row] = ratelimit.status(conn)
    assert row["window_requests"] == 5 and row["window_tokens"] == 50
    assert row["granted_requests"] == 5 and row["waits"] == 1
    time.sleep(wait)
    assert take(conn, "b", 1, 10) == 0


def test_tokens_are_limited_as_well_as_requests(conn: psycopg.Connection) -> None:
    ratelimit.set_budget(conn, "t", Budget(max_requests=1000, max_tokens=100, per_seconds=1, burst_seconds=1,
                                           headroom=1))
    assert take(conn, "t", 1, 60) == 0
    assert take(conn, "t", 1, 30) == 0
    assert take(conn, "t", 1, 20) > 0  # 110 tokens would not fit in 100
    assert take(conn, "t", 1, 10) == 0  # but 100 do


def test_the_pacer_spreads_a_budget_out(conn: psycopg.Connection) -> None:
    # 10 a second, of which 0.2 s worth (2) may go at once; then one every 0.1 s
    ratelimit.set_budget(conn, "p", Budget(max_requests=10, per_seconds=1, burst_seconds=0.2, headroom=1))
    assert [take(conn, "p") for _ in range(2)] == [0, 0]
    wait = take(conn, "p")
    assert 0.05 < wait <= 0.1 + 1e-6


def test_a_request_bigger_than_the_budget_goes_alone_and_never_deadlocks(conn: psycopg.Connection) -> None:
    ratelimit.set_budget(conn, "big", Budget(max_tokens=100, per_seconds=0.2, burst_seconds=0.2, headroom=1))
    assert take(conn, "big", 1, 300) == 0  # 3 budgets' worth, into an empty window: granted
    assert take(conn, "big", 1, 1) > 0  # nothing else until the average is back in budget
    started = time.monotonic()
    while (wait := take(conn, "big", 1, 300)) > 0:
        assert time.monotonic() - started < 3, "an oversized request must be granted eventually"
        time.sleep(wait)
    # 300 tokens at 500 a second: the second one waited about 0.6 s for the first's debt
    assert 0.4 < time.monotonic() - started < 1.5


def test_changing_a_budget_applies_at_once_and_forgets_no_grant(conn: psycopg.Connection) -> None:
    ratelimit.set_budget(conn, "c", Budget(max_requests=3, per_seconds=1, burst_seconds=1, headroom=1))
    assert [take(conn, "c") for _ in range(3)] == [0, 0, 0]
    ratelimit.set_budget(conn, "c", Budget(max_requests=3, per_seconds=2, burst_seconds=1, headroom=1))
    assert take(conn, "c") > 0  # the 3 grants still count under the new window
    ratelimit.set_budget(conn, "c", Budget(max_requests=10, per_seconds=2, burst_seconds=1, headroom=1))
    assert take(conn, "c") == 0  # a raised budget is spendable right away
    assert ratelimit.clear_budget(conn, "c")
    assert conn.execute("SELECT count(*) FROM pgembed.rate_limit_state").fetchone() == (0,)
    assert take(conn, "c") == 0
    assert not ratelimit.clear_budget(conn, "c")


def test_a_worker_role_needs_only_the_documented_rights(conn: psycopg.Connection, dsn: str) -> None:
    """The grants written at the top of sql/ratelimit.sql are enough, and a hostile
    lookalike of a pg_catalog function earlier on the caller's path changes nothing."""
    role = f"rl_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        conn.execute(f"GRANT USAGE ON SCHEMA pgembed TO {role}")
        conn.execute(f"GRANT SELECT ON pgembed.rate_limits TO {role}")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE ON pgembed.rate_limit_state TO {role}")
        conn.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
        ratelimit.set_budget(conn, "w", Budget(max_requests=2, per_seconds=60, burst_seconds=60, headroom=1))
        with psycopg.connect(make_conninfo(dsn, user=role), autocommit=True) as worker:
            # a clock that stands still and a floor that is always 0: both would break the ring
            worker.execute(
                f"CREATE FUNCTION {role}.clock_timestamp() RETURNS timestamptz "
                "LANGUAGE sql AS $$SELECT '2000-01-01'::timestamptz$$"
            )
            worker.execute(
                f"CREATE FUNCTION {role}.floor(double precision) RETURNS double precision "
                "LANGUAGE sql AS 'SELECT 0::double precision'"
            )
            worker.execute(f"SET search_path = {role}, pg_catalog")
            assert [take(worker, "w") for _ in range(2)] == [0, 0]
            assert take(worker, "w") > 1  # the third of 2 a minute waits
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                worker.execute("UPDATE pgembed.rate_limits SET max_requests = 1000")
    finally:
        conn.execute(f"DROP SCHEMA IF EXISTS {role} CASCADE")
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


# -------------------------------------------------------------------- providers


class RecordingLimiter:
    """An in-memory RateLimiter that grants everything and remembers what was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    async def acquire(self, requests: int, tokens: int) -> None:
        self.calls.append((requests, tokens))


def test_without_a_limiter_the_provider_is_unchanged(api: TimedAPI) -> None:
    async def go() -> None:
        async with provider(api) as p:
            assert p.limiter is None
            result = await p.embed(["alpha beta", "gamma", "delta epsilon zeta", "eta"])
            assert result.errors == [None] * 4 and result.requests == 2

    asyncio.run(go())
    assert api.requests == 2


def test_every_attempt_asks_the_limiter_first(api: TimedAPI) -> None:
    """Retries and the requests that isolate a rejected input are requests too."""
    limiter = RecordingLimiter()
    api.fail_next(2, status=429, retry_after=0.01)
    api.always_reject("POISON")
    texts = ["one two", "three", "POISON four", "five six seven", "eight", "nine"]

    async def go() -> None:
        async with provider(api, limiter) as p:
            result = await p.embed(texts)
        assert result.errors[2] is not None and result.errors.count(None) == 5
        assert result.requests == api.requests

    asyncio.run(go())
    assert len(limiter.calls) == api.requests == len(api.log) > 4
    assert all(requests == 1 for requests, _ in limiter.calls)
    sent = sorted(sum(fake_token_count(t) for t in entry["input"]) for entry in api.log)
    assert sorted(tokens for _, tokens in limiter.calls) == sent


def test_a_limiter_that_fails_fails_the_call_and_sends_nothing(api: TimedAPI) -> None:
    class Broken:
        async def acquire(self, requests: int, tokens: int) -> None:
            raise RuntimeError(f"cannot reach the budget for {KEY}")

    async def go() -> None:
        async with provider(api, Broken()) as p:
            await p.embed(["alpha"])

    with pytest.raises(ProviderError, match="rate limiter failed") as caught:
        asyncio.run(go())
    assert KEY not in str(caught.value)
    assert api.requests == 0


def test_an_unreachable_database_is_a_provider_error(api: TimedAPI, tmp_path: Path) -> None:
    async def go() -> None:
        limits = RateLimits(f"host={tmp_path} port=1 dbname=none connect_timeout=2")
        async with limits, provider(api, limits.limiter("b")) as p:
            await p.embed(["alpha"])

    with pytest.raises(RateLimitUnavailable, match="cannot connect to PostgreSQL"):
        asyncio.run(go())
    assert issubclass(RateLimitUnavailable, ProviderError)
    assert api.requests == 0


def test_the_limiter_reconnects_after_losing_its_connection(dsn: str, conn: psycopg.Connection) -> None:
    ratelimit.set_budget(conn, "r", Budget(max_requests=1000, per_seconds=1))

    async def go() -> None:
        async with RateLimits(dsn) as limits:
            limiter = limits.limiter("r")
            await limiter.acquire(1, 0)
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'pgembed-ratelimit' AND datname = current_database()"
            )
            await limiter.acquire(1, 0)

    asyncio.run(go())
    assert conn.execute("SELECT granted_requests FROM pgembed.rate_limit_state").fetchone() == (2,)


def test_make_provider_still_builds_an_unlimited_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGEMBED_OPENAI_API_KEY", KEY)
    built = make_provider(SPEC)
    assert isinstance(built, OpenAIProvider) and built.limiter is None
    asyncio.run(built.aclose())


# ------------------------------------------------------------------------ secrets


def test_the_api_key_never_reaches_the_database(
    api: TimedAPI, dsn: str, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGEMBED_OPENAI_API_KEY", KEY)
    monkeypatch.setenv("PGEMBED_OPENAI_BASE_URL", api.base_url.replace("://", "://user:" + KEY + "@"))
    bucket = ratelimit.set_openai_budget(conn, Budget(max_requests=100, max_tokens=10_000, per_seconds=1))

    async def go() -> None:
        async with RateLimits(dsn) as limits:
            limiter = limits.for_spec(SPEC)
            assert limiter is not None and limiter.bucket == bucket
            async with provider(api, limiter) as p:
                result = await p.embed([f"text {i}" for i in range(6)])
                assert result.errors == [None] * 6

    asyncio.run(go())
    fingerprint = ratelimit.key_fingerprint(KEY)
    relations = [
        name
        for (name,) in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'pgembed' AND c.relkind IN ('r', 'v', 'm') ORDER BY 1"
        )
    ]
    assert {"rate_limits", "rate_limit_state", "rate_limit_status"} <= set(relations)
    seen = ""
    for name in relations:
        for (text,) in conn.execute(f'SELECT t::text FROM pgembed."{name}" t'):
            seen += text + "\n"
    assert fingerprint in seen  # what identifies the key is there...
    assert KEY not in seen and KEY[8:24] not in seen  # ...the key, or a piece of it, is not
    assert ratelimit.status(conn)[0]["granted_requests"] == 2


# -------------------------------------------------------------------- under load


async def _drive(p: OpenAIProvider, deadline: float, seed: str) -> int:
    """Embed random small batches until the deadline; returns the texts embedded."""
    rng = random.Random(seed)
    done = 0
    while time.time() < deadline:
        texts = [f"{seed}-{done}-{i} " + " ".join(["w"] * rng.randint(2, 13)) for i in range(rng.randint(1, 6))]
        result = await p.embed(texts)
        assert result.errors == [None] * len(texts), result.errors
        done += len(texts)
    return done


async def _client(dsn: str, base_url: str, deadline: float, seed: str) -> dict[str, Any]:
    """One worker's worth: its own connection for the budget, its own HTTP client."""
    async with RateLimits(dsn) as limits:
        limiter = limits.limiter(ratelimit.bucket_name(base_url, KEY))
        p = OpenAIProvider(
            SPEC,
            api_key=KEY,
            base_url=base_url,
            concurrency=2,
            timeout=5.0,
            backoff_base=0.01,
            backoff_max=0.05,
            token_counter=fake_token_count,
            limiter=limiter,
        )
        async with p:
            texts = await _drive(p, deadline, seed)
    return {"texts": texts}


def client_process_main() -> None:
    """A client in a process of its own: `ready`, then a start line on stdin, then a report."""
    dsn, base_url, seed = sys.argv[1:4]
    print("ready", flush=True)
    deadline = float(sys.stdin.readline())
    print(json.dumps(asyncio.run(_client(dsn, base_url, deadline, seed))), flush=True)


GRANT_LOG = """
CREATE TABLE public.grant_log (decided double precision, requests bigint, tokens bigint);
CREATE FUNCTION public.log_grant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- paced_at is the clock reading take_budget decided on (epoch seconds)
    IF NEW.granted_requests > OLD.granted_requests THEN
        INSERT INTO public.grant_log VALUES (NEW.paced_at, NEW.granted_requests - OLD.granted_requests,
                                             NEW.granted_tokens - OLD.granted_tokens);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER log_grant AFTER UPDATE ON pgembed.rate_limit_state
    FOR EACH ROW EXECUTE FUNCTION public.log_grant();
"""


def test_many_clients_in_many_processes_share_one_budget(api: TimedAPI, dsn: str, conn: psycopg.Connection) -> None:
    """4 asyncio clients and 2 processes, each with its own connection, spend one budget for
    RUN_SECONDS; then every window of what was granted, and of what the API received, is
    checked against it."""
    conn.execute(GRANT_LOG)
    bucket = ratelimit.bucket_name(api.base_url, KEY)
    budget = Budget(max_requests=MAX_REQUESTS, max_tokens=MAX_TOKENS, per_seconds=WINDOW, burst_seconds=BURST)
    ratelimit.set_budget(conn, bucket, budget)
    code = "import sys; sys.path.insert(0, '.'); from tests.test_ratelimit import client_process_main as m; m()"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, dsn, api.base_url, f"p{i}"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        started = time.time()
        deadline = started + RUN_SECONDS
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(f"{deadline}\n")
            process.stdin.flush()

        async def in_process() -> list[dict[str, Any]]:
            async def storm() -> None:  # the API throttles too: those retries ask the budget again
                await asyncio.sleep(1.0)
                api.fail_next(5, status=429, retry_after=0.02)

            clients = [_client(dsn, api.base_url, deadline, f"t{i}") for i in range(4)]
            *reports, _ = await asyncio.gather(*clients, storm())
            return reports

        reports = asyncio.run(in_process())
        for process in processes:
            out, _ = process.communicate(timeout=60)
            assert process.returncode == 0
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    # Every request the API saw was granted by the budget, exactly once, retries included.
    grants = [(t, tokens) for t, requests, tokens in conn.execute("SELECT * FROM public.grant_log") if requests == 1]
    [state] = ratelimit.status(conn)
    assert api.statuses[429] == 5
    assert len(grants) == state["granted_requests"] == api.requests == len(api.arrivals)
    assert sum(n for _, n in grants) == sum(n for _, n in api.arrivals)
    assert all(r["texts"] > 0 for r in reports), reports  # every client got a share

    # Exactly: no window of WINDOW seconds was granted more than the budget.
    granted = heaviest_window(grants, WINDOW)
    assert granted[0] <= MAX_REQUESTS and granted[1] <= MAX_TOKENS, granted
    # End to end: what the API received, allowing for the delay from grant to arrival.
    slack = 1 + (BURST + LATENCY) / WINDOW
    received = heaviest_window(api.arrivals, WINDOW)
    assert received[0] <= MAX_REQUESTS * slack and received[1] <= MAX_TOKENS * slack, received

    # And the budget was used: the binding one at 70% or more while the clients ran.
    during = [(t, n) for t, n in grants if t < deadline]
    requests_used = len(during) / (MAX_REQUESTS * RUN_SECONDS / WINDOW)
    tokens_used = sum(n for _, n in during) / (MAX_TOKENS * RUN_SECONDS / WINDOW)
    assert max(requests_used, tokens_used) >= 0.7, (requests_used, tokens_used)
    print(
        f"\n{len(grants)} requests: {requests_used:.0%} of the request budget, {tokens_used:.0%} of the "
        f"token budget; heaviest {WINDOW:g}s window granted {granted}, received {received} "
        f"(budget {MAX_REQUESTS}, {MAX_TOKENS})"
    )


# ------------------------------------------------------- the worker, search, the CLI

MODEL = "openai:text-embedding-3-small"


def _notes(conn: psycopg.Connection, rows: int) -> str:
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO notes SELECT g, 'note number ' || g FROM generate_series(1, %s) g", (rows,))
    return pipelines.create(conn, "notes", "body", MODEL, pipelines.PipelineOptions(dimensions=64))


def _limiter_sessions(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name LIKE 'pgembed-ratelimit%' AND datname = current_database()"
    ).fetchone()
    return row[0] if row else 0


def test_the_worker_spends_the_budget_of_its_key_and_closes_its_connection(
    conn: psycopg.Connection, dsn: str, fake_api: FakeAPI
) -> None:
    _notes(conn, 12)
    bucket = ratelimit.set_openai_budget(conn, Budget(max_requests=1000, per_seconds=1))
    stats = drain(dsn, batch_size=4, bulk_batch_size=4)
    assert stats.written == 12
    [row] = ratelimit.status(conn)
    assert row["bucket"] == bucket
    assert row["granted_requests"] == fake_api.requests == 3  # every request, asked first
    deadline = time.monotonic() + 5  # a closed session leaves pg_stat_activity a moment later
    while _limiter_sessions(conn) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _limiter_sessions(conn) == 0, "the worker left its budget connection open"


def test_a_budget_that_cannot_be_consulted_puts_the_batch_back_like_an_api_outage(
    conn: psycopg.Connection, dsn: str, fake_api: FakeAPI
) -> None:
    name = _notes(conn, 10)
    conn.execute("ALTER FUNCTION pgembed.take_budget(text, int, bigint) RENAME TO take_budget_gone")
    stats = drain(dsn, batch_size=10, outage_backoff=60)
    assert stats.provider_errors == 1 and stats.written == 0
    assert fake_api.requests == 0, "nothing may be sent without a grant"
    queued, later, leased = conn.execute(
        "SELECT count(*), bool_and(available_at > now() + interval '30 seconds'), count(lease_id) "
        "FROM pgembed.outbox"
    ).fetchone()
    assert (queued, later, leased) == (10, True, 0), "put back, with the outage backoff"
    assert conn.execute("SELECT count(*) FROM pgembed.failures").fetchone() == (0,), "not the rows' fault"

    conn.execute("ALTER FUNCTION pgembed.take_budget_gone(text, int, bigint) RENAME TO take_budget")
    conn.execute("UPDATE pgembed.outbox SET available_at = now()")
    assert drain(dsn, batch_size=10).written == 10
    assert conn.execute(f'SELECT count(*) FROM pgembed."{name}"').fetchone() == (10,)


class CountingLimits(RateLimits):
    """RateLimits that counts its round trips to PostgreSQL."""

    asked = 0

    async def ask(self, bucket: str, requests: int, tokens: int, bulk: bool = False,
                  seen: Any = None) -> tuple[float, bool]:
        self.asked += 1
        return await super().ask(bucket, requests, tokens, bulk, seen)


def test_a_bucket_without_a_budget_is_not_asked_per_request(dsn: str, conn: psycopg.Connection) -> None:
    recheck = 0.5

    async def go() -> None:
        async with CountingLimits(dsn, unlimited_recheck=recheck) as limits:
            limiter = limits.limiter("free")
            for _ in range(50):
                await limiter.acquire(1, 100)
            assert limits.asked == 1, "50 grants, 1 round trip"
            ratelimit.set_budget(conn, "free", Budget(max_requests=1, per_seconds=60))
            await limiter.acquire(1, 0)  # the new budget is not known yet...
            assert limits.asked == 1
            await asyncio.sleep(recheck)
            await limiter.acquire(1, 0)  # ...and is within `recheck`: the first of 1 a minute
            assert limits.asked == 2
            with pytest.raises(TimeoutError):  # the second must wait a minute
                await asyncio.wait_for(limiter.acquire(1, 0), 0.3)

    asyncio.run(go())
    assert conn.execute("SELECT granted_requests FROM pgembed.rate_limit_state").fetchone() == (1,)


def test_a_search_query_spends_the_same_budget_outside_the_callers_transaction(
    conn: psycopg.Connection, dsn: str, fake_api: FakeAPI
) -> None:
    name = _notes(conn, 3)
    drain(dsn)
    before = fake_api.requests
    assert search(conn, name, "no budget yet", k=1)
    assert fake_api.requests == before + 1
    assert conn.execute("SELECT count(*) FROM pgembed.rate_limit_state").fetchone() == (0,)

    bucket = ratelimit.set_openai_budget(conn, Budget(max_requests=100, per_seconds=1))
    with conn.transaction():
        assert search(conn, name, "with a budget", k=1)
        # the grant was taken on a connection of its own: its row lock is not ours to hold
        with psycopg.connect(dsn, autocommit=True, options="-c lock_timeout=2s") as other:
            assert take(other, bucket) == 0
    assert ratelimit.status(conn)[0]["granted_requests"] == 2
    assert fake_api.requests == before + 2


def test_the_command_line_sets_shows_and_clears_a_budget(
    dsn: str, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGEMBED_OPENAI_API_KEY", KEY)
    monkeypatch.setenv("PGEMBED_OPENAI_BASE_URL", "http://localhost:8000/v1/")
    bucket = ratelimit.bucket_name("http://localhost:8000/v1", KEY)
    assert "no budgets" in cli("ratelimit", "show", "--dsn", dsn).output

    done = cli("ratelimit", "set", "--requests-per-minute", "3000", "--tokens-per-minute", "1000000",
               "--dsn", dsn)
    assert done.exit_code == 0, done.output
    assert bucket in done.output and KEY not in done.output
    [row] = ratelimit.status(conn)
    assert (row["bucket"], row["max_requests"], row["max_tokens"], row["per_seconds"]) == (bucket, 3000, 1_000_000, 60)
    assert (row["base_url"], row["key_fingerprint"]) == ("http://localhost:8000/v1", ratelimit.key_fingerprint(KEY))

    shown = cli("ratelimit", "show", "--dsn", dsn)
    assert shown.exit_code == 0, shown.output
    assert bucket in shown.output and "3,000" in shown.output and "1,000,000" in shown.output

    tokens_only = cli("ratelimit", "set", "--tokens-per-minute", "500", "--bucket", "other", "--dsn", dsn)
    assert tokens_only.exit_code == 0, tokens_only.output
    assert {r["bucket"]: r["max_requests"] for r in ratelimit.status(conn)} == {bucket: 3000, "other": None}

    cleared = cli("ratelimit", "clear", "--dsn", dsn)
    assert cleared.exit_code == 0 and "removed" in cleared.output
    assert [r["bucket"] for r in ratelimit.status(conn)] == ["other"]

    monkeypatch.delenv("PGEMBED_OPENAI_API_KEY")
    for args, message in {
        ("set", "--dsn", dsn): "give --requests-per-minute, --tokens-per-minute or both",
        ("set", "--requests-per-minute", "10", "--dsn", dsn): "or name the budget with --bucket",
        ("clear", "--bucket", "nope", "--dsn", dsn): "no budget for nope",
    }.items():
        failed = cli("ratelimit", *args)
        assert failed.exit_code == 1 and message in failed.output, (args, failed.output)
        assert "Traceback" not in failed.output
