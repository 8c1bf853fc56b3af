"""In-process batching (pgembed.aio.AsyncClient, the gateway's engine): concurrent calls of
one window share upstream requests, identical texts in flight are sent once, cache hits
never go upstream, one rejected input fails alone, and the ledger adds up to the bill."""

from __future__ import annotations

import asyncio

import numpy as np
import psycopg
import pytest

from pgembed import pipelines
from pgembed.aio import AsyncClient, apportion
from pgembed.attribution import Attribution
from pgembed.batcher import Batcher, EmbedError
from pgembed.providers import ModelSpec
from pgembed.providers.hashing import hash_vector
from tests.conftest import drain

MODEL = "openai:text-embedding-3-small"
WINDOW = 0.5  # long enough that every call of a gather lands in one window


def run(coro):
    return asyncio.run(coro)


async def _embed_each(dsn, texts, **options):
    async with AsyncClient(dsn, window=WINDOW, **options) as client:
        return await asyncio.gather(*(client.embed([t], MODEL) for t in texts), return_exceptions=True)


def test_concurrent_calls_share_one_upstream_request(dsn, fake_api):
    texts = [f"query number {i}" for i in range(100)]
    vectors = run(_embed_each(dsn, texts))
    assert fake_api.requests == 1 and fake_api.inputs == 100
    for text, (vector,) in zip(texts, vectors, strict=True):
        assert vector.dtype == np.float32
        assert np.array_equal(vector, np.asarray(hash_vector(text, 1536), dtype=np.float32))


def test_a_batch_is_flushed_at_the_input_limit(dsn, fake_api):
    run(_embed_each(dsn, [f"text {i}" for i in range(25)], max_batch=10))
    assert [len(entry["input"]) for entry in fake_api.log] == [10, 10, 5]


def test_a_batch_is_flushed_at_the_token_limit(conn, dsn, fake_api):
    conn.execute("INSERT INTO pgembed.models (model, dimensions, short_name, max_batch_tokens) "
                 "VALUES ('openai:small-batches', 1536, 'smb', 40)")
    texts = [" ".join(["word"] * 9) + f" {i}" for i in range(8)]  # 11 cl100k tokens each

    async def go():
        async with AsyncClient(dsn, window=WINDOW) as client:
            return await asyncio.gather(*(client.embed([t], "openai:small-batches") for t in texts))

    run(go())
    assert [len(entry["input"]) for entry in fake_api.log] == [3, 3, 2]


def test_identical_texts_in_flight_are_sent_once_and_each_caller_is_counted(conn, dsn, fake_api):
    async def go():
        async with AsyncClient(dsn, window=WINDOW) as client:
            return await asyncio.gather(*(
                client.embed(["the same question"], MODEL, attribution=Attribution(user=f"u{i}"))
                for i in range(10)))

    vectors = run(go())
    assert fake_api.requests == 1 and fake_api.received == ["the same question"]
    assert all(np.array_equal(v[0], vectors[0][0]) for v in vectors)
    rows = conn.execute("SELECT app_user, cache_hits, cache_misses, tokens FROM pgembed.usage "
                        "ORDER BY app_user").fetchall()
    assert len(rows) == 10 and sum(r[2] for r in rows) == 1 and sum(r[1] for r in rows) == 9
    assert sum(r[3] for r in rows) == fake_api.tokens


def test_cache_hits_never_go_upstream(conn, dsn, fake_api):
    run(_embed_each(dsn, ["alpha", "beta"]))
    assert fake_api.requests == 1
    again = run(_embed_each(dsn, ["alpha", "beta"]))
    assert fake_api.requests == 1, "answered from pgembed.embedding_cache"
    assert np.array_equal(again[0][0], np.asarray(hash_vector("alpha", 1536), dtype=np.float32))
    hits, misses = conn.execute("SELECT sum(cache_hits), sum(cache_misses) FROM pgembed.usage").fetchone()
    assert (hits, misses) == (2, 2)


def test_one_rejected_input_fails_alone(conn, dsn, fake_api):
    fake_api.always_reject("POISON")
    results = run(_embed_each(dsn, ["good one", "POISON pill", "good two"]))
    assert isinstance(results[1], EmbedError) and results[1].status == 400
    assert "rejected by the API" in results[1].message
    assert [len(r) for r in (results[0], results[2])] == [1, 1]
    assert conn.execute("SELECT count(*) FROM pgembed.embedding_cache").fetchone()[0] == 2
    assert conn.execute("SELECT sum(tokens) FROM pgembed.usage").fetchone()[0] == fake_api.tokens


def test_an_upstream_outage_is_a_503_for_every_caller_and_nothing_is_cached(conn, dsn, fake_api):
    fake_api.fail_next(100, status=500)
    results = run(_embed_each(dsn, ["one", "two"]))
    assert all(isinstance(r, EmbedError) and r.status == 503 for r in results)
    assert conn.execute("SELECT count(*) FROM pgembed.embedding_cache").fetchone()[0] == 0
    assert conn.execute("SELECT sum(cache_misses), sum(tokens) FROM pgembed.usage").fetchone() == (2, 0)
    fake_api.reset()
    assert len(run(_embed_each(dsn, ["one"]))[0]) == 1, "the next call works"


def test_the_ledger_adds_up_to_the_bill_over_many_labels(conn, dsn, fake_api):
    async def go():
        async with AsyncClient(dsn, window=WINDOW) as client:
            await asyncio.gather(*(
                client.embed([f"text {i} " + "more words " * (i % 7)], MODEL,
                             attribution=Attribution(source="user_query", user=f"user{i % 3}", task=f"t{i % 2}"))
                for i in range(40)))

    run(go())
    rows = conn.execute("SELECT app_user, task, sum(tokens), sum(requests), sum(inputs) FROM pgembed.usage "
                        "WHERE source = 'user_query' AND purpose = 'query' GROUP BY 1, 2").fetchall()
    assert len(rows) == 6
    assert sum(r[2] for r in rows) == fake_api.tokens
    assert sum(r[3] for r in rows) == fake_api.requests
    assert sum(r[4] for r in rows) == 40


@pytest.mark.parametrize(("total", "weights", "expected"), [
    (10, [1, 1, 1], [4, 3, 3]), (1, [5, 3], [1, 0]), (0, [2, 2], [0, 0]), (7, [0, 0], [7, 0]), (3, [], []),
])
def test_apportion_sums_to_the_total(total, weights, expected):
    assert apportion(total, weights) == expected


def test_unknown_model_and_impossible_size_are_the_callers_errors(dsn, fake_api):
    from pgembed.aio import UnknownModel

    async def go():
        async with AsyncClient(dsn) as client:
            with pytest.raises(UnknownModel, match="unknown model"):
                await client.spec("openai:no-such-model")
            with pytest.raises(ValueError, match="between 1 and 1536"):
                await client.spec(MODEL, 4096)

    run(go())
    assert fake_api.requests == 0


@pytest.fixture
def notes(conn, dsn, fake_api):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, lang text NOT NULL, body text NOT NULL)")
    conn.execute("INSERT INTO notes SELECT g, CASE WHEN g % 2 = 0 THEN 'en' ELSE 'fr' END, "
                 "'note ' || g || ' about lighthouses' FROM generate_series(1, 20) g")
    name = pipelines.create(conn, "notes", "body", MODEL, pipelines.PipelineOptions())
    conn.execute("SELECT pgembed.set_alias('notes_search', %s)", (name,))
    drain(dsn)
    fake_api.reset()
    return name


def test_concurrent_searches_share_upstream_calls(conn, dsn, fake_api, notes):
    async def go():
        async with AsyncClient(dsn, window=WINDOW) as client:
            return await asyncio.gather(*(
                client.search("notes_search", f"lighthouse question {i}", k=3, filter={"lang": "en"},
                              attribution=Attribution(user="reader")) for i in range(20)))

    found = run(go())
    assert fake_api.requests == 1 and fake_api.inputs == 20
    assert all(len(hits) == 3 and all(h.key["id"] % 2 == 0 for h in hits) for hits in found)
    assert conn.execute("SELECT count(DISTINCT pipeline), sum(cache_misses) FROM pgembed.usage "
                        "WHERE app_user = 'reader'").fetchone() == (1, 20)


# ---------------------------------------------------------------- the Batcher on its own

SPEC = ModelSpec("hash:4", 4, 4, max_batch_inputs=3)


def _batcher(calls, fail=None, window=0.05):
    async def flush(spec, entries):
        calls.append([e.text for e in entries])
        if fail is not None:
            raise fail
        for e in entries:
            e.future.set_result(np.full(4, len(e.text), dtype=np.float32))
    return Batcher(flush, window=window)


def test_a_caller_that_goes_away_leaves_the_answer_to_the_others():
    calls = []

    async def go():
        batcher = _batcher(calls)
        first = asyncio.ensure_future(batcher.embed(SPEC, "shared"))
        second = asyncio.ensure_future(batcher.embed(SPEC, "shared"))
        await asyncio.sleep(0)
        first.cancel()
        vector = await second
        await batcher.aclose()
        return first.cancelled(), vector

    cancelled, vector = asyncio.run(go())
    assert cancelled and vector.tolist() == [6.0] * 4 and calls == [["shared"]]


def test_a_failing_flush_fails_its_batch_with_a_503_and_the_next_batch_is_sent():
    calls = []

    async def go():
        batcher = _batcher(calls, fail=RuntimeError("database is gone"))
        results = await asyncio.gather(*(batcher.embed(SPEC, t) for t in "abcd"), return_exceptions=True)
        assert batcher.depth == 0
        return results

    results = asyncio.run(go())
    assert calls == [["a", "b", "c"], ["d"]], "flushed at the spec's 3 inputs, the rest at the window"
    assert all(isinstance(r, EmbedError) and r.status == 503 and "database is gone" in r.message for r in results)


def test_a_text_is_sent_again_once_its_batch_is_answered():
    calls = []

    async def go():
        batcher = _batcher(calls, window=0)
        await batcher.embed(SPEC, "again")
        await batcher.embed(SPEC, "again")

    asyncio.run(go())
    assert calls == [["again"], ["again"]], "the second finds it in the cache (AsyncClient), not in flight"


def test_a_lookup_answers_what_it_finds_at_once_and_a_failed_one_fails_alone():
    seen = []

    async def lookup(spec, entries):
        for e in entries:
            if e.text == "cached":
                e.future.set_result(np.zeros(4, dtype=np.float32))
            elif e.text == "broken":
                e.future.set_exception(EmbedError("cannot read the embedding cache: gone", 503))

    async def flush(spec, entries):
        seen.append([(e.text, e.future.done()) for e in entries])
        for e in entries:
            if not e.future.done():
                e.future.set_result(np.ones(4, dtype=np.float32))

    async def go():
        batcher = Batcher(flush, window=3600, lookup=lookup)
        # a guard, not a timing: without the lookup this would wait for the hour's window
        first = await asyncio.wait_for(batcher.embed(SPEC, "cached"), 60)
        waiting = batcher.depth
        later = asyncio.gather(batcher.embed_all(SPEC, ["fresh", "cached"]), batcher.embed(SPEC, "broken"),
                               return_exceptions=True)
        await asyncio.sleep(0)
        await batcher.aclose()
        return first, waiting, await later

    first, waiting, (both, broken) = asyncio.run(go())
    assert first.tolist() == [0.0] * 4 and waiting == 1, "answered while its lane still waits"
    assert [v.tolist() for v in both] == [[1.0] * 4, [0.0] * 4]
    assert isinstance(broken, EmbedError) and broken.status == 503 and "cache" in broken.message
    assert seen == [[("cached", True), ("fresh", False)]], "one entry for both callers; the broken one not sent"


def test_a_cache_hit_does_not_wait_for_its_window_and_is_still_counted(conn, dsn, fake_api):
    run(_embed_each(dsn, ["cached text"]))

    async def go():
        async with AsyncClient(dsn, window=3600) as client:
            # a guard, not a timing: answered from the cache, not after the hour's window
            hit = await asyncio.wait_for(client.embed(["cached text"], MODEL, attribution=Attribution(user="r")), 60)
            return hit, client.batcher.depth

    (vector,), waiting = run(go())
    assert waiting == 1, "its lane had not been flushed when it was answered"
    assert np.array_equal(vector, np.asarray(hash_vector("cached text", 1536), dtype=np.float32))
    assert fake_api.requests == 1
    assert conn.execute("SELECT cache_hits, cache_misses, requests, tokens FROM pgembed.usage "
                        "WHERE app_user = 'r'").fetchall() == [(1, 0, 0, 0)], "counted at the flush on close"


def test_answers_do_not_wait_for_the_ledger_and_a_clean_shutdown_writes_it(conn, dsn, fake_api):
    blocker = psycopg.connect(dsn)
    blocker.execute("LOCK TABLE pgembed.usage IN SHARE MODE")  # every INSERT into it waits

    async def go():
        async with AsyncClient(dsn, window=0.01) as client:
            ask = lambda: client.embed(["written later"], MODEL, attribution=Attribution(user="w"))  # noqa: E731
            first = await asyncio.wait_for(ask(), 60)
            again = await asyncio.wait_for(ask(), 60)
            unwritten = blocker.execute("SELECT count(*) FROM pgembed.usage").fetchone()[0]
            pending = client.recorder.pending
            blocker.commit()  # the lock goes: the close writes what is pending
            return first, again, unwritten, pending

    try:
        (first,), (again,), unwritten, pending = run(go())
    finally:
        blocker.close()
    assert unwritten == 0 and pending > 0, "both callers were answered while the ledger could not be written"
    assert np.array_equal(first, again) and fake_api.requests == 1, "the unwritten vector is a cache hit"
    assert conn.execute("SELECT sum(cache_misses), sum(cache_hits), sum(tokens), sum(requests) FROM pgembed.usage "
                        "WHERE app_user = 'w'").fetchone() == (1, 1, fake_api.tokens, 1)
    assert conn.execute("SELECT count(*) FROM pgembed.embedding_cache").fetchone()[0] == 1


def test_the_calls_of_one_loop_turn_share_one_lookup():
    lookups = []

    async def lookup(spec, entries):
        lookups.append(sorted(e.text for e in entries))

    async def flush(spec, entries):
        for e in entries:
            e.future.set_result(np.ones(4, dtype=np.float32))

    async def go():
        batcher = Batcher(flush, window=0.01, lookup=lookup)
        await asyncio.gather(*(batcher.embed_all(SPEC, [t, "shared"]) for t in "xy"))
        await batcher.embed(SPEC, "z")

    asyncio.run(go())
    assert lookups == [["shared", "x", "y"], ["z"]], "one query for the gather's calls, each text once"


def test_a_cache_that_cannot_be_read_is_a_503_before_anything_is_spent(conn, dsn, fake_api):
    conn.execute("ALTER TABLE pgembed.embedding_cache RENAME TO embedding_cache_away")
    try:
        results = run(_embed_each(dsn, ["one", "two"]))
    finally:
        conn.execute("ALTER TABLE pgembed.embedding_cache_away RENAME TO embedding_cache")
    assert all(isinstance(r, EmbedError) and r.status == 503 and "embedding cache" in r.message for r in results)
    assert fake_api.requests == 0
    assert conn.execute("SELECT count(*) FROM pgembed.usage").fetchone()[0] == 0
    assert len(run(_embed_each(dsn, ["one"]))[0]) == 1, "the next call works"


def test_a_ledger_the_database_refuses_is_logged_with_what_it_dropped(conn, dsn, fake_api, caplog):
    conn.execute("ALTER TABLE pgembed.usage RENAME TO usage_away")
    try:
        with caplog.at_level("WARNING", logger="pgembed.recorder"):
            (vector,) = run(_embed_each(dsn, ["answered anyway"]))[0]
    finally:
        conn.execute("ALTER TABLE pgembed.usage_away RENAME TO usage")
    assert len(vector) == 1536, "the caller was answered before the write"
    assert "could not record 1 cache entries and 1 usage rows" in caplog.text
