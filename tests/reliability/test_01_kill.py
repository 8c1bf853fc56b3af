"""1. kill -9 at random moments while workers drain under a concurrent write load, and a
worker paused (SIGSTOP) past its lease that must write nothing when it resumes."""

from __future__ import annotations

import random
import signal
import time

import pytest

from tests.reliability.convergence import converge
from tests.reliability.harness import (
    FORMS,
    WriteLoad,
    api_pipeline,
    body_expect,
    explain,
    leased_keys,
    make_docs,
    outbox_count,
    poll_until,
    wait_for,
)


@pytest.mark.parametrize("form", FORMS)
def test_kill_9_during_drain_and_a_paused_worker_writes_nothing(form, dsn, db, api, fleet, results):
    rows = form.pick(1_000, 20_000)
    kills = form.pick(3, 20)
    n_workers = form.pick(2, 3)
    batch = form.pick(16, 64)
    lease = form.pick(3.0, 5.0)
    load_ops = form.pick(300, 4_000)
    api.latency(0.05)
    conn = db
    make_docs(conn, "docs", rows)
    name = api_pipeline(conn, "docs")
    start = time.monotonic()
    for _ in range(n_workers):
        fleet.start(batch_size=batch, lease=lease)
    load = WriteLoad(dsn, "docs", rows + 1, load_ops, pause=form.pick(0.004, 0.002)).start()

    rng = random.Random(4)
    moments = {"during an API call": 0, "at a random moment": 0}
    for _ in range(kills):
        time.sleep(rng.uniform(0.1, form.pick(0.6, 1.5)))
        victim = rng.choice(fleet.alive())
        if rng.random() < 0.5:
            # during the API call: the fake API holds a request of this worker's batch
            if poll_until(lambda: api.in_flight > 0, 5, 0.005):
                moments["during an API call"] += 1
        else:
            moments["at a random moment"] += 1
        fleet.kill9(victim)
        fleet.start(batch_size=batch, lease=lease)
    last_kill = time.monotonic()
    load.join()
    wait_for(lambda: outbox_count(conn) == 0,
             form.pick(60, 600), "the drain after the kills")
    drained = time.monotonic() - last_kill

    # a worker paused past its lease: others take its rows; when it resumes it writes nothing
    conn.execute(f"INSERT INTO docs SELECT g, 'late row ' || g FROM generate_series({10**7}, {10**7 + 4 * batch}) g")
    api.latency(0.5)
    paused = wait_for(lambda: next((w for w in fleet.alive() if leased_keys(conn, w)), None), 20,
                      "a worker holding a lease")
    paused.signal(signal.SIGSTOP)
    held = leased_keys(conn, paused)
    api.latency(0.02)
    # its rows come back when the lease expires, or, if it was stopped inside an
    # acknowledgement (holding their row locks), when that session is ended for idling
    redone = poll_until(lambda: conn.execute("SELECT count(*) FROM pgembed.outbox WHERE key = ANY(%s::jsonb[])",
                                             (held,)).fetchone()[0] == 0, lease + 30, 0.05)
    assert redone, "the paused worker's rows were not re-done by the others\n" + explain(conn, fleet)
    before = conn.execute("SELECT id, chunk_seq, xmin::text FROM pgembed.docs_te3s_16 "
                          "WHERE jsonb_build_array(id::text) = ANY(%s::jsonb[]) ORDER BY 1, 2", (held,)).fetchall()
    assert len(before) == len(held)
    seen = len(paused.text())
    paused.signal(signal.SIGCONT)
    # it acknowledges (and finds it holds nothing), or, if it was stopped inside an
    # acknowledgement, finds its session ended; either way it writes nothing
    wait_for(lambda: any(w in paused.text()[seen:] for w in (" lost", "unavailable")) or not paused.alive(),
             30, "the resumed worker's acknowledgement", 0.1)
    time.sleep(0.5)
    after = conn.execute("SELECT id, chunk_seq, xmin::text FROM pgembed.docs_te3s_16 "
                         "WHERE jsonb_build_array(id::text) = ANY(%s::jsonb[]) ORDER BY 1, 2", (held,)).fetchall()
    assert after == before, "a worker that lost its lease wrote"

    report = converge(conn, [body_expect(name, "docs")], api=api, timeout=form.pick(60, 300),
                      bound=lambda ideal: ideal + load_ops + (kills + 2) * batch * 2 * 2 + len(held))
    results.add("1 kill -9 + lease loss", form.name,
                load=f"{rows} rows, {n_workers} workers, {load_ops} concurrent writes",
                faults=f"{kills} × kill -9 ({moments['during an API call']} during an API call), "
                       f"1 × SIGSTOP past a {lease:g}s lease",
                inputs="distinct text per row; inserts, updates, deletes, PK changes",
                report=report, seconds=drained,
                total_s=round(time.monotonic() - start, 1), load_errors=load.errors)
