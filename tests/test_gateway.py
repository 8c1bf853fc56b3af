"""`pgembed serve` over HTTP with the real openai client: byte-identical vectors to the
provider's (float and base64), bearer tokens, attribution labels in the ledger, failures
mapped to OpenAI's statuses, /v1/search, /healthz and /metrics."""

from __future__ import annotations

import base64
import concurrent.futures

import httpx2 as httpx
import numpy as np
import openai
import pytest

from pgembed import pipelines
from tests.conftest import drain
from tests.gateway_server import TOKEN, gateway

TEXTS = ["The lighthouse keeper", "ünïcödé and emoji 🌊", "a" * 3000, "numbers 3.14159 2.71828"]


def clients(fake_api, url):
    direct = openai.OpenAI(base_url=fake_api.base_url, api_key="sk-direct", max_retries=0)
    through = openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0)
    return direct, through


@pytest.mark.parametrize("dimensions", [None, 256])
def test_vectors_are_byte_identical_to_the_providers(dsn, fake_api, dimensions):
    extra = {} if dimensions is None else {"dimensions": dimensions}
    with gateway(dsn) as url:
        direct, through = clients(fake_api, url)
        with direct, through:
            for fmt in ("float", "base64", None):  # None: the SDK asks base64 and decodes it itself
                kw = dict(extra) if fmt is None else {**extra, "encoding_format": fmt}
                theirs = direct.embeddings.create(model="text-embedding-3-small", input=TEXTS, **kw)
                ours = through.embeddings.create(model="text-embedding-3-small", input=TEXTS, **kw)
                assert ours.model == "text-embedding-3-small" and [d.index for d in ours.data] == [0, 1, 2, 3]
                for a, b in zip(theirs.data, ours.data, strict=True):
                    if fmt == "base64":
                        assert isinstance(b.embedding, str) and base64.b64decode(b.embedding) == \
                            base64.b64decode(a.embedding)
                    else:
                        assert np.asarray(b.embedding, np.float32).tobytes() == \
                            np.asarray(a.embedding, np.float32).tobytes()
                        assert len(b.embedding) == (dimensions or 1536)
    # one upstream request for the first format, the other two answered from the cache
    assert [entry["input"] for entry in fake_api.log].count(TEXTS) == 3 + 1


def test_a_token_is_required_and_compared(dsn, fake_api):
    with gateway(dsn, tokens=("first-token", TOKEN)) as url:
        for key in ("wrong", "first-toke", "first-token-and-more"):
            with pytest.raises(openai.AuthenticationError) as caught, \
                    openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client:
                client.embeddings.create(model="text-embedding-3-small", input="x")
            assert caught.value.body["code"] == "invalid_api_key"
        anonymous = httpx.post(f"{url}/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
        assert anonymous.status_code == 401 and "Bearer" in anonymous.json()["error"]["message"]
        for key in ("first-token", TOKEN):
            with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client:
                client.embeddings.create(model="text-embedding-3-small", input="x")
    assert fake_api.requests == 1


def test_labels_from_headers_and_the_user_field_are_recorded_and_add_up(conn, dsn, fake_api):
    with gateway(dsn) as url:
        client = openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0,
                               default_headers={"X-Pgembed-Source": "note_index", "X-Pgembed-Task": "import",
                                                "X-Pgembed-Purpose": "index"})
        with client, concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: client.embeddings.create(model="text-embedding-3-small",
                                                             input=[f"note {i}", f"title {i}"], user=f"u{i % 2}"),
                          range(16)))
        bad = httpx.post(f"{url}/embeddings", headers={"Authorization": f"Bearer {TOKEN}",
                                                       "X-Pgembed-Purpose": "gossip"},
                         json={"model": "text-embedding-3-small", "input": "x"})
        assert bad.status_code == 400 and "purpose" in bad.json()["error"]["message"]
    rows = conn.execute("SELECT app_user, sum(inputs), sum(tokens), sum(requests) FROM pgembed.usage "
                        "WHERE source = 'note_index' AND task = 'import' AND purpose = 'index' "
                        "GROUP BY 1 ORDER BY 1").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("u0", 16), ("u1", 16)]
    assert sum(r[2] for r in rows) == fake_api.tokens
    assert sum(r[3] for r in rows) == fake_api.requests
    assert conn.execute("SELECT count(*) FROM pgembed.usage WHERE purpose <> 'index'").fetchone()[0] == 0


def test_failures_get_openai_statuses_and_spare_batch_mates(dsn, fake_api):
    fake_api.always_reject("POISON")
    with gateway(dsn, window_ms=20) as url, openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0) as client:

        def embed(text):
            try:
                return client.embeddings.create(model="text-embedding-3-small", input=text).data[0].embedding
            except openai.APIStatusError as error:
                return error

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            good, poisoned, other = pool.map(embed, ["fine", "POISON", "also fine"])
        assert isinstance(poisoned, openai.BadRequestError) and "rejected" in poisoned.message
        assert len(good) == len(other) == 1536
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.embeddings.create(model="no-such-model", input="x")
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(model="text-embedding-3-small", input="x", dimensions=5000)
        fake_api.fail_next(1000, status=503)
        with pytest.raises(openai.InternalServerError) as caught:
            client.embeddings.create(model="text-embedding-3-small", input="upstream is down")
        assert caught.value.status_code == 503
        fake_api.reset()
        assert client.embeddings.create(model="text-embedding-3-small", input="upstream is down").data


def test_local_and_hash_models_are_named_in_full(dsn, fake_api):
    with gateway(dsn) as url, openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0) as client:
        answer = client.embeddings.create(model="hash:32", input=["a b", "c"])
    assert [len(d.embedding) for d in answer.data] == [32, 32] and answer.model == "hash:32"
    assert fake_api.requests == 0


@pytest.fixture
def notes(conn, dsn):
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, lang text NOT NULL, body text NOT NULL)")
    conn.execute("INSERT INTO notes SELECT g, CASE WHEN g % 2 = 0 THEN 'en' ELSE 'fr' END, "
                 "'note ' || g || ' about lighthouses' FROM generate_series(1, 12) g")
    name = pipelines.create(conn, "notes", "body", "hash:64", pipelines.PipelineOptions())
    conn.execute("SELECT pgembed.set_alias('notes_search', %s)", (name,))
    drain(dsn)
    return name


def test_search_by_text_or_vector_with_filters(conn, dsn, fake_api, notes):
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Pgembed-User": "reader"}
    with gateway(dsn) as url:
        by_text = httpx.post(f"{url}/search", headers=headers,
                             json={"target": "notes_search", "query": "note 4 about lighthouses", "k": 3,
                                   "filter": {"lang": "en"}})
        assert by_text.status_code == 200, by_text.text
        data = by_text.json()["data"]
        assert len(data) == 3 and data[0]["key"] == {"id": 4} and data[0]["distance"] == pytest.approx(0, abs=1e-6)
        assert all(hit["key"]["id"] % 2 == 0 and "chunk" in hit and "chunk_seq" in hit for hit in data)
        vector = pipelines_vector(conn, notes, 5)
        by_vector = httpx.post(f"{url}/search", headers=headers, json={"target": notes, "vector": vector, "k": 1})
        assert by_vector.json()["data"][0]["key"] == {"id": 5}
        for body, words in [({"target": "nowhere", "query": "x"}, "nowhere"),
                            ({"target": notes, "query": "x", "filter": {"colour": "red"}}, "colour"),
                            ({"target": notes, "vector": [1.0, 2.0]}, "dimension"),
                            ({"target": notes, "query": "x", "vector": [1.0]}, "exactly one"),
                            ({"target": notes, "query": "x", "k": 0}, "'k'")]:
            refused = httpx.post(f"{url}/search", headers=headers, json=body)
            assert refused.status_code == 400 and words in refused.json()["error"]["message"], refused.text
    # the first query's text is a chunk the worker embedded: a hit in the shared cache
    assert conn.execute("SELECT array_agg(DISTINCT pipeline), sum(cache_hits) >= 1 FROM pgembed.usage "
                        "WHERE app_user = 'reader'").fetchone() == ([notes], True)


def pipelines_vector(conn, name, key):
    row = conn.execute(f'SELECT embedding::real[] FROM pgembed."{name}" WHERE id = %s', (key,)).fetchone()
    return [float(x) for x in row[0]]


def test_healthz_and_metrics(dsn, fake_api):
    with gateway(dsn) as url:
        root = url.removesuffix("/v1")
        assert httpx.get(f"{root}/healthz").json()["status"] == "ok"
        with openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0) as client:
            client.embeddings.create(model="text-embedding-3-small", input=["m1", "m2"])
        text = httpx.get(f"{root}/metrics").text
    for name in ("pgembed_gateway_queue_depth", "pgembed_gateway_batch_size_bucket",
                 "pgembed_gateway_window_wait_seconds_bucket", "pgembed_gateway_upstream_latency_seconds_bucket",
                 "pgembed_gateway_cache_hit_ratio"):
        assert name in text
    assert 'pgembed_gateway_requests_total{route="embeddings",status="200"} 1.0' in text
    assert "pgembed_gateway_cache_misses_total 2.0" in text


def test_healthz_says_when_the_schema_is_not_at_head(empty_dsn):
    import psycopg

    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
    with gateway(empty_dsn) as url:
        answer = httpx.get(url.removesuffix("/v1") + "/healthz")
    assert answer.status_code == 503 and "pgembed init" in answer.json()["problem"]


def test_a_big_answer_is_printed_off_the_event_loop_and_still_identical(dsn, fake_api):
    texts = [f"document {i} of a big import" for i in range(100)]  # 100 × 3,072 floats
    with gateway(dsn) as url:
        direct, through = clients(fake_api, url)
        with direct, through:
            theirs = direct.embeddings.create(model="text-embedding-3-large", input=texts, encoding_format="float")
            ours = through.embeddings.create(model="text-embedding-3-large", input=texts, encoding_format="float")
    assert np.asarray([d.embedding for d in ours.data], np.float32).tobytes() == \
        np.asarray([d.embedding for d in theirs.data], np.float32).tobytes()
    assert ours.usage.prompt_tokens > 0


def test_upstream_requests_spend_the_shared_rate_limit(conn, dsn, fake_api):
    from pgembed import ratelimit

    bucket = ratelimit.set_openai_budget(conn, ratelimit.Budget.per_minute(6000, 10_000_000))
    with gateway(dsn) as url, openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0) as client:
        for i in range(3):
            client.embeddings.create(model="text-embedding-3-small", input=[f"limited {i}", f"other {i}"])
    granted = conn.execute("SELECT granted_requests, granted_tokens FROM pgembed.rate_limit_status "
                           "WHERE bucket = %s", (bucket,)).fetchone()
    assert granted[0] == fake_api.requests == 3 and granted[1] > 0
