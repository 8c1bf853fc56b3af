"""8. Long transactions: an application transaction that inserts rows and stays open blocks
nothing (other writes keep being embedded meanwhile) and its rows are embedded once, after
it commits; a rolled-back transaction leaves no trace in the outbox and costs nothing."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.reliability.convergence import converge, duplicate_inputs
from tests.reliability.harness import FORMS, api_pipeline, body_expect, make_docs, outbox_count, wait_for


@pytest.mark.parametrize("form", FORMS)
def test_open_and_rolled_back_transactions(form, dsn, db, api, fleet, results):
    hold = form.pick(3.0, 60.0)
    make_docs(db, "docs", 100)
    name = api_pipeline(db, "docs")
    fleet.start(batch_size=32, concurrency=2, poll=0.2, lease=60)
    wait_for(lambda: outbox_count(db) == 0, 60, "the backfill")
    latencies = []
    with psycopg.connect(dsn) as app, psycopg.connect(dsn) as rolled:
        app.execute("INSERT INTO docs SELECT g, 'inserted by the long transaction ' || g "
                    "FROM generate_series(1001, 1200) g")
        app.execute("UPDATE docs SET body = body || ' (touched by the long transaction)' WHERE id <= 10")
        rolled.execute("INSERT INTO docs SELECT g, 'rolled back text ' || g FROM generate_series(5001, 5100) g")
        rolled.rollback()
        deadline = time.monotonic() + hold
        i = 0
        while time.monotonic() < deadline:  # the rest of the application goes on meanwhile
            i += 1
            started = time.monotonic()
            db.execute("INSERT INTO docs VALUES (%s, %s)", (2000 + i, f"written beside it {i}"))
            wait_for(lambda: outbox_count(db) == 0, 30,
                     "a row written beside the open transaction to be embedded")
            latencies.append(time.monotonic() - started)
            time.sleep(0.2)
        assert outbox_count(db) == 0, "the open transaction's rows are invisible"
        app.commit()
    committed = time.monotonic()
    # ideal counts today's texts; the 10 rows the transaction updated were embedded before too
    report = converge(db, [body_expect(name, "docs")], api=api, bound=lambda ideal: ideal + 10)
    assert duplicate_inputs(api.received) == 0, "a row was embedded more than once"
    assert not [t for t in api.received if t.startswith("rolled back")], "rolled-back rows were embedded"
    results.add("8 long transactions", form.name,
                load=f"200 inserts + 10 updates held open {hold:g}s; {i} writes beside it; "
                     "100 inserts rolled back",
                faults="open transaction, rollback", inputs="distinct text per row",
                report=report, seconds=time.monotonic() - committed,
                slowest_write_beside_s=round(max(latencies), 2))
