"""3. The embedding API fails: a total outage then recovery, a 429 storm with Retry-After,
answers slower than the client's timeout, connection resets. Nothing is lost, nothing
parked (none of it is the rows' fault), Retry-After is obeyed, and no text is paid for
twice. With a shared rate limit, the fleet stays within its budget."""

from __future__ import annotations

import itertools
import time
from collections import Counter

import pytest

from pgembed import ratelimit
from tests.reliability.convergence import converge, duplicate_inputs
from tests.reliability.harness import FORMS, api_pipeline, body_expect, make_docs, outbox_count, scalar, wait_for
from tests.test_ratelimit import GRANT_LOG, heaviest_window


@pytest.mark.parametrize("form", FORMS)
def test_outage_429_storm_timeouts_and_resets(form, db, api, fleet, results):
    rows = form.pick(240, 4_000)
    outage = form.pick(2.0, 30.0)
    storm = form.pick(8, 40)
    retry_after = 0.3
    make_docs(db, "docs", rows)
    name = api_pipeline(db, "docs")
    env = {"PGEMBED_OPENAI_TIMEOUT": "1"}
    if not form.full:
        # a short outage is ridden out by the provider's own retries; the full form runs
        # into the worker's outage backoff (30 s) and the release path
        env.update(PGEMBED_OPENAI_MAX_ATTEMPTS="40", PGEMBED_OPENAI_BACKOFF_MAX="0.2")
    started = time.monotonic()

    # 1. 100% errors for `outage` seconds, then recovery
    api.fail_next(10**9, status=503)
    worker = fleet.start(batch_size=32, concurrency=1, lease=60, env=env)
    time.sleep(outage)
    api.fail_next(0)
    wait_for(lambda: outbox_count(db) == 0, outage + 90, "recovery")
    outage_errors = sum(1 for a in api.arrivals if a.status == 503)

    # 2. a 429 storm with Retry-After: one worker slot, so consecutive attempts are its own
    db.execute("UPDATE docs SET body = body || ' (storm)' WHERE id <= %s", (rows // 4,))
    before = len(api.arrivals)
    api.fail_next(storm, status=429, retry_after=retry_after)
    wait_for(lambda: outbox_count(db) == 0, 120, "the storm to pass")
    stormy = api.arrivals[before:]
    # a retry of the same request (same texts) must wait Retry-After; a request for another
    # batch, after the provider gave one up, is counted apart (see the report)
    gaps = [b.at - a.at for a, b in itertools.pairwise(stormy) if a.status == 429 and a.texts == b.texts]
    hasty = sum(1 for a, b in itertools.pairwise(stormy)
                if a.status == 429 and a.texts != b.texts and b.at - a.at < retry_after * 0.9)
    assert gaps, "no retry after a 429"
    assert min(gaps) >= retry_after * 0.9, f"Retry-After {retry_after}s not obeyed: waited {min(gaps):.3f}s"

    # 3. answers slower than the client's timeout (1 s), then 4. connection resets
    db.execute("UPDATE docs SET body = body || ' (slow)' WHERE id > %s AND id <= %s", (rows // 4, rows // 2))
    hangs = form.pick(2, 6)
    api.hang(hangs, seconds=2.5)
    wait_for(lambda: outbox_count(db) == 0, 120, "the hangs to pass")
    db.execute("UPDATE docs SET body = body || ' (reset)' WHERE id > %s", (rows // 2,))
    api.reset_next(form.pick(3, 10))
    last_fault = time.monotonic()
    report = converge(db, [body_expect(name, "docs")], api=api,
                      bound=lambda ideal: ideal + rows + sum(a.inputs for a in api.arrivals if a.status != 200)
                      + 10 * 32)
    # a request the client gave up on is still answered (and billed) by the server: those
    # texts are the only ones that may be paid for twice
    twice = duplicate_inputs(api.ok_inputs())
    assert twice <= hangs * 32, f"{twice} texts were paid for twice"
    assert scalar(db, "SELECT count(*) FROM pgembed.failures") == 0, "an API fault was blamed on rows"
    assert worker.alive()
    statuses = Counter(a.status for a in api.arrivals)
    results.add("3 API outage, 429 storm, timeouts, resets", form.name,
                load=f"{rows} rows + 3 rewrites of a quarter to a half of them, 1 worker",
                faults=f"{outage:g}s of 100% 503 ({outage_errors} requests), {storm} × 429 "
                       f"(Retry-After {retry_after}s), {form.pick(2, 6)} answers past the 1s timeout, "
                       f"{form.pick(3, 10)} connection resets",
                inputs="distinct text per row", report=report, seconds=time.monotonic() - last_fault,
                statuses=dict(sorted((str(k), v) for k, v in statuses.items())),
                min_wait_after_429_s=round(min(gaps), 3), paid_twice=twice,
                next_batch_sooner_than_retry_after=hasty,
                total_s=round(time.monotonic() - started, 1))


# A request reaches the API a little after its grant (scheduling, HTTP, the fake API's own
# thread, on a loaded 2-core machine): allowed for when counting what the API received.
LATENCY = 0.3


@pytest.mark.parametrize("form", FORMS)
def test_shared_rate_limit_budget_across_workers(form, db, api, fleet, results):
    """Three worker processes, each with a connection of its own to the budget, spend one
    budget set in PostgreSQL. Every request the API saw was granted by it; no window of the
    database's grant decisions holds more than the budget (the guarantee, exactly); and no
    window of the API's arrivals holds more than the budget plus what can be granted during
    the pacer's burst and a request's trip to the API."""
    budget_requests, window, burst = 10, 2.0, 0.2
    rows = form.pick(120, 600)
    make_docs(db, "docs", rows)
    name = api_pipeline(db, "docs")
    db.execute(GRANT_LOG)
    bucket = ratelimit.set_openai_budget(
        db, ratelimit.Budget(max_requests=budget_requests, per_seconds=window, burst_seconds=burst),
        api_key=fleet.env["PGEMBED_OPENAI_API_KEY"], base_url=api.base_url)
    for _ in range(3):
        fleet.start(batch_size=4, concurrency=2, lease=120)
    report = converge(db, [body_expect(name, "docs")], api=api, timeout=form.pick(120, 400),
                      bound=lambda ideal: ideal)
    arrivals = [(a.at, 1) for a in api.arrivals]
    grants = [(t, n) for t, n, _ in db.execute("SELECT * FROM public.grant_log")]
    granted = int(scalar(db, "SELECT coalesce(sum(granted_requests), 0) FROM pgembed.rate_limit_status "
                             "WHERE bucket = %s", (bucket,)))
    busiest_granted, _ = heaviest_window(grants, window)
    busiest, _ = heaviest_window(arrivals, window)
    allowed = int(budget_requests * (1 + (burst + LATENCY) / window))
    results.add("3b shared rate limit", form.name, load=f"{rows} rows, 3 workers × 2 slots, 4 rows a request",
                faults=f"budget {budget_requests} requests / {window:g}s shared by all workers",
                inputs="distinct text per row", report=report,
                busiest_window_granted=busiest_granted, busiest_window_requests=busiest,
                requests=len(arrivals), limiter_grants=granted)
    assert granted > 0, f"the workers never asked the shared budget ({len(arrivals)} requests, bucket {bucket})"
    assert granted == sum(n for _, n in grants) >= len(arrivals), (
        f"{len(arrivals)} requests reached the API, {granted} were granted")
    assert busiest_granted <= budget_requests, (
        f"{busiest_granted} requests granted in one {window:g}s window over a budget of {budget_requests}")
    assert busiest <= allowed, (
        f"{busiest} requests reached the API in one {window:g}s window: over the budget of {budget_requests} "
        f"plus {allowed - budget_requests} for the grant-to-arrival delay (bucket {bucket})")
