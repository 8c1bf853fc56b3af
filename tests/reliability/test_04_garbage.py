"""4. Garbage from the API: wrong number of vectors, wrong dimensions, NaN, a body that is
not JSON, an empty data list. Each is a clear failure of the rows it touched, never a
stored vector; re-queued, those rows land once the API behaves."""

from __future__ import annotations

import time

import pytest

from tests.fakeapi import GARBAGE_KINDS
from tests.reliability.convergence import converge
from tests.reliability.harness import FORMS, api_pipeline, body_expect, make_docs, outbox_count, scalar, wait_for

MESSAGES = {
    "wrong_dims": ("dimensions, expected 16",),
    "nan": ("NaN or Infinity",),
    # one embedding short of a one-input request (two slots claiming at once can split a
    # round's rows that small) is an empty list
    "wrong_count": ("embeddings for", "no embeddings"),
    "empty_data": ("no embeddings",),
    "not_json": ("not a JSON embeddings response",),
    "huge": ("out of range",),
    "zero": ("all-zero vector",),
}


@pytest.mark.parametrize("form", FORMS)
def test_garbage_answers_are_failures_never_vectors(form, db, api, fleet, results):
    per_kind = form.pick(8, 64)
    rounds = form.pick(1, 4)
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    name = api_pipeline(db, "docs")
    fleet.start(batch_size=per_kind, concurrency=1, max_attempts=1, poll=0.1)
    next_id = 1
    seen: dict[str, list[str]] = {}
    for _ in range(rounds):
        for kind in GARBAGE_KINDS:
            api.garbage(kind, 1)
            make_docs(db, "docs", per_kind, start=next_id)
            next_id += per_kind
            wait_for(lambda: outbox_count(db) == 0, 60, f"{kind} to be handled")
            errors = [e for (e,) in db.execute("SELECT error FROM pgembed.failures WHERE parked_at IS NOT NULL "
                                               "AND (key->>0)::int >= %s", (next_id - per_kind,))]
            seen.setdefault(kind, []).extend(errors)
    for kind, errors in seen.items():
        assert errors, f"{kind}: no row failed"
        assert all(any(m in e for m in MESSAGES[kind]) for e in errors), f"{kind}: unclear failures {set(errors)}"
    # nothing malformed was stored: every stored vector is checked by the convergence check
    failed = scalar(db, "SELECT count(*) FROM pgembed.failures")
    assert scalar(db, "SELECT pgembed.retry_failures()") == failed
    last_fault = time.monotonic()
    report = converge(db, [body_expect(name, "docs")], api=api,
                      bound=lambda ideal: ideal + len(GARBAGE_KINDS) * rounds * per_kind)
    assert scalar(db, "SELECT count(*) FROM pgembed.failures") == 0
    results.add("4 garbage from the API", form.name,
                load=f"{next_id - 1} rows, 1 worker, {per_kind} rows a request",
                faults=f"{rounds} × each of {', '.join(GARBAGE_KINDS)}",
                inputs="distinct text per row", report=report, seconds=time.monotonic() - last_fault,
                rows_failed_then_retried=failed)
