"""6. Races: a row updated 50 times while it is embedded; a row deleted during its
embedding (no vectors may appear after the delete committed); a primary key changed
mid-flight; the pipeline dropped while a worker holds its rows (and while it is writing
them); two pipelines with different models on one table."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgembed import pipelines
from tests.reliability.convergence import converge
from tests.reliability.harness import (
    FORMS,
    api_pipeline,
    body_expect,
    make_docs,
    sampling,
    scalar,
    wait_for,
)


@pytest.mark.parametrize("form", FORMS)
def test_races_with_a_batch_in_flight(form, dsn, db, api, fleet, results):
    rows = form.pick(40, 2_000)
    updates = 50
    make_docs(db, "docs", rows)
    a = api_pipeline(db, "docs")
    b = pipelines.create(db, "docs", "body", "hash:16")  # a second model on the same table
    api.latency(1.0)
    worker = fleet.start(batch_size=rows, concurrency=2, lease=60, poll=0.1)
    wait_for(lambda: api.in_flight > 0, 30, "the batch to be in flight")
    seen_deleted: list[int] = []
    deleted_at: list[float] = []

    def watch(c: psycopg.Connection) -> None:
        if deleted_at:
            seen_deleted.append(scalar(c, f"SELECT count(*) FROM pgembed.{a} WHERE id = 2")
                                + scalar(c, f"SELECT count(*) FROM pgembed.{b} WHERE id = 2"))

    with sampling(dsn, 0.01, watch):
        for i in range(updates):
            db.execute("UPDATE docs SET body = %s WHERE id = 1", (f"row one, version {i}",))
        with db.transaction():
            db.execute("DELETE FROM docs WHERE id = 2")
        deleted_at.append(time.monotonic())
        db.execute("UPDATE docs SET id = 3003 WHERE id = 3")
        api.latency(0.0)
        last_fault = time.monotonic()
        report = converge(db, [body_expect(a, "docs"), body_expect(b, "docs")], api=api,
                          bound=lambda ideal: ideal + 2 * rows + updates)
    assert seen_deleted and not any(seen_deleted), "vectors of a deleted row appeared after its delete"
    versions = [t for t in api.received if t.startswith("row one, version")]
    assert len(versions) <= 3, f"a row updated {updates} times mid-flight was embedded {len(versions)} times"
    assert worker.alive()
    results.add("6 races", form.name,
                load=f"{rows} rows, 2 pipelines (API model + hash model) on one table, 1 worker",
                faults=f"{updates} updates of a row in flight, delete in flight, PK change in flight, "
                       "pipeline dropped in flight and mid-acknowledgement",
                inputs="distinct text per row", report=report, seconds=time.monotonic() - last_fault,
                embeddings_of_the_hot_row=len(versions))


def test_pipeline_dropped_while_a_worker_holds_and_writes_its_rows(dsn, db, api, fleet):
    make_docs(db, "docs", 300)
    make_docs(db, "other", 50)
    name = api_pipeline(db, "docs")
    keep = api_pipeline(db, "other")
    # (1) dropped while a real worker embeds a batch of it: the API holds every request
    # unanswered until released (30 s at most, so a drop that waits fails instead of hanging)
    # and the worker's client waits for its answer that long
    api.hang(10_000, seconds=30)
    worker = fleet.start(batch_size=64, concurrency=2, lease=60, poll=0.1,
                         env={"PGEMBED_OPENAI_TIMEOUT": "120"})
    wait_for(lambda: api.in_flight > 0, 30, "a batch in flight")
    pipelines.drop(db, name)
    # the drop returned while the worker's request was still held: it did not wait for it
    answered = sum(api.stats()["statuses"].values())
    assert api.in_flight > 0 and answered == 0, (
        f"drop_pipeline returned only after {answered} embedding requests were answered")
    assert scalar(db, "SELECT to_regclass(%s)", (f"pgembed.{name}",)) is None
    api.release()
    converge(db, [body_expect(keep, "other")])
    assert worker.alive(), worker.text()[-2000:]
    assert "Traceback" not in worker.text(), worker.text()[-3000:]

    # (2) dropped while a worker is inside its acknowledgement: it holds the outbox rows
    # (held) and is about to write the destination; the drop must wait for it, not deadlock
    # the worker goes first: alive, it could lease the new rows before this test does
    worker.signal(9)
    worker.wait(30)
    make_docs(db, "third", 20)
    third = api_pipeline(db, "third")
    lease = uuid.uuid4()
    claimed = db.execute("SELECT key FROM pgembed.claim('test', %s, 10, 60, '') WHERE pipeline = %s",
                         (lease, third)).fetchall()
    keys = [k for (k,) in claimed]
    assert len(keys) == 10
    pid = scalar(db, "SELECT id FROM pgembed.pipelines WHERE name = %s", (third,))
    errors: list[BaseException] = []
    with psycopg.connect(dsn) as ack:
        ack.execute("SET lock_timeout = '20s'")
        # what pgembed.acknowledge locks first: the batch's rows still under its lease
        held = ack.execute("SELECT key FROM pgembed.outbox WHERE pipeline = %s AND lease_id = %s "
                           "AND key = ANY(%s) FOR UPDATE", (third, lease, [Jsonb(k) for k in keys])).fetchall()
        assert len(held) == len(keys)

        def drop() -> None:
            try:
                with psycopg.connect(dsn, autocommit=True) as c:
                    c.execute("SET lock_timeout = '20s'")
                    c.execute("SELECT pgembed.drop_pipeline(%s)", (third,))
            except BaseException as error:
                errors.append(error)

        dropper = threading.Thread(target=drop)
        dropper.start()
        time.sleep(0.5)  # the drop is now waiting for the acknowledgement's row locks
        ack.execute(f"DELETE FROM pgembed.third_te3s_16 WHERE id = ANY(%s)  -- p{pid}_store",
                    ([int(k[0]) for k in keys],))
        ack.execute("DELETE FROM pgembed.outbox WHERE pipeline = %s AND key = ANY(%s)",
                    (third, [Jsonb(k) for k in keys]))
        ack.commit()
        dropper.join(30)
    assert not errors, f"drop_pipeline failed against an acknowledgement: {errors[0]!r}"
    assert scalar(db, "SELECT to_regclass('pgembed.third_te3s_16')") is None
