"""Chunking that fits the model (issue 13): no row fails for being long, chunks are counted
in the model's own tokens, 'none' keeps the strict behaviour, 'truncate' is flagged, and
re-chunking unchanged text gives the same chunks (cache hits)."""

from __future__ import annotations

import itertools

import pytest

from pgembed import pipelines
from pgembed.providers.base import ModelSpec
from pgembed.splitting import Counter, Plan, budget, cl100k_counter, split
from tests.conftest import drain

MINILM = "local:all-MiniLM-L6-v2"
SENTENCE = "Chunks follow sentences where they can, so each one reads as a whole thought. "
LONG = "\n\n".join(" ".join([SENTENCE] * 6) for _ in range(8))  # ~900 WordPiece tokens
MARKDOWN = "# Title\n\nIntro paragraph.\n\n```python\ndef f():\n    return 1\n```\n\n## Part two\n\n- one\n- two\n"
CL100K = Counter("cl100k", 1_000_000)


def test_a_text_that_fits_is_one_chunk_verbatim():
    text = "  short text, spaces kept  \n"
    assert split(Plan("recursive", 50, 7), CL100K, text) == [split(Plan("none", 0, 0), CL100K, text)[0]]
    assert split(Plan("recursive", 50, 7), CL100K, text)[0].text == text


@pytest.mark.parametrize("strategy", ["recursive", "markdown"])
def test_chunks_fit_the_budget_and_overlap(strategy):
    pieces = split(Plan(strategy, 60, 9), CL100K, LONG)
    assert len(pieces) > 10
    assert all(CL100K.count(p.text) <= 60 for p in pieces)
    assert not any(p.truncated for p in pieces)
    # neighbours share text: a sentence cut at one edge is whole in the next chunk
    assert any(a.text[-40:] in b.text for a, b in itertools.pairwise(pieces))


def test_rechunking_unchanged_text_gives_the_same_chunks():
    assert split(Plan("recursive", 60, 9), CL100K, LONG) == split(Plan("recursive", 60, 9), CL100K, LONG)


def test_markdown_keeps_a_code_block_whole():
    pieces = split(Plan("markdown", 20, 0), CL100K, MARKDOWN)
    assert any("def f():\n    return 1" in p.text for p in pieces)


def test_truncate_keeps_the_start_and_says_so():
    (piece,) = split(Plan("truncate", 40, 0), CL100K, LONG)
    assert piece.truncated and LONG.startswith(piece.text) and CL100K.count(piece.text) <= 40
    assert split(Plan("truncate", 40, 0), CL100K, "fits") == split(Plan("none", 0, 0), CL100K, "fits")


def test_the_budget_never_passes_the_window():
    small = Counter("cl100k", 100)
    assert budget(Plan("recursive", 256, 38), small) == (100, 14)
    assert budget(Plan("recursive", 200, 30), CL100K) == (200, 30)


def test_a_model_without_a_declared_tokenizer_keeps_a_quarter_free():
    spec = ModelSpec("openai:bge-on-vllm", 768, 768, max_input_tokens=512)
    assert cl100k_counter(spec, None).window == 384
    assert cl100k_counter(spec, "cl100k").window == 512


def test_an_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown chunking strategy 'semantic'"):
        split(Plan("semantic", 10, 0), CL100K, LONG)


@pytest.mark.local_model
def test_local_chunks_are_counted_in_the_model_s_own_tokens():
    from pgembed.providers.local import chunk_counter, load_model, resolve_model

    counter = chunk_counter(ModelSpec(MINILM, 384, 384, max_input_tokens=256))
    assert counter.window == 254  # 256 less [CLS] and [SEP]
    model = load_model(resolve_model("all-MiniLM-L6-v2"))
    pieces = split(Plan("recursive", 254, 38), counter, LONG)
    assert len(pieces) >= 3
    assert max(model.token_counts([p.text for p in pieces])) <= 256


@pytest.fixture
def long_rows(conn):
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO docs VALUES (1, %s), (2, 'a short row')", (LONG,))
    return conn


@pytest.mark.local_model
def test_a_long_row_is_chunked_by_default_and_fails_with_chunking_none(long_rows, dsn):
    chunked = pipelines.create(long_rows, "docs", "body", MINILM)
    strict = pipelines.create(long_rows, "docs", "body", MINILM, pipelines.PipelineOptions(chunking="none"))
    drain(dsn, max_attempts=1)
    counts = long_rows.execute(f'SELECT id, count(*), bool_or(truncated) FROM pgembed."{chunked}" '
                               "GROUP BY id ORDER BY id").fetchall()
    assert counts[0][0] == 1 and counts[0][1] >= 4 and counts[1] == (2, 1, False)
    ((key, error),) = long_rows.execute("SELECT key, error FROM pgembed.failures WHERE pipeline = %s",
                                        (strict,)).fetchall()
    assert key == ["1"] and "more than the model's limit of 256" in error
    assert long_rows.execute("SELECT count(*) FROM pgembed.failures WHERE pipeline = %s",
                             (chunked,)).fetchone() == (0,)


def test_a_truncated_row_is_flagged_on_its_chunk(long_rows, dsn):
    name = pipelines.create(long_rows, "docs", "body", "hash:8",
                            pipelines.PipelineOptions(chunking="truncate", chunk_tokens=40))
    drain(dsn)
    rows = long_rows.execute(f'SELECT id, chunk_seq, truncated FROM pgembed."{name}" ORDER BY id').fetchall()
    assert rows == [(1, 0, True), (2, 0, False)]


def test_unchanged_text_hits_the_cache_when_embedded_again(long_rows, dsn):
    name = pipelines.create(long_rows, "docs", "body", "hash:8", pipelines.PipelineOptions(chunk_tokens=None))
    drain(dsn)
    long_rows.execute("SELECT pgembed.queue_all(%s, 'repair')", (name,))
    drain(dsn)
    hits, misses = long_rows.execute(
        "SELECT sum(cache_hits), sum(cache_misses) FROM pgembed.usage WHERE purpose = 'repair'").fetchone()
    assert misses == 0 and hits > 1


@pytest.fixture
def articles(conn):
    conn.execute("CREATE TABLE articles (id int PRIMARY KEY, title text, body text)")
    conn.execute("INSERT INTO articles VALUES (1, 'Lighthouses', %s), (2, E'odd\\x1etitle', 'short body'), "
                 "(3, 'Blank', '   ')", (LONG,))
    return conn


def test_a_chunk_prefix_heads_every_chunk_and_follows_its_column(articles, dsn):
    name = pipelines.create(articles, "articles", "body", "hash:8",
                            pipelines.PipelineOptions(chunk_prefix="title", chunk_tokens=60))
    drain(dsn)
    chunks = articles.execute(f'SELECT id, chunk FROM pgembed."{name}" ORDER BY id, chunk_seq').fetchall()
    assert len([c for i, c in chunks if i == 1]) > 5
    assert all(c.startswith("Lighthouses\n") for i, c in chunks if i == 1)
    assert [c for i, c in chunks if i == 2] == ["odd title\nshort body"]  # U+001E in a value is a space
    assert not [c for i, c in chunks if i == 3]  # blank content: nothing to embed, title or not
    articles.execute("UPDATE articles SET title = 'Beacons' WHERE id = 1")  # the prefix's column queues it
    drain(dsn)
    assert articles.execute(f'SELECT bool_and(chunk LIKE %s) FROM pgembed."{name}" WHERE id = 1',
                            ("Beacons\n%",)).fetchone() == (True,)
    assert articles.execute("SELECT kind FROM pgembed.gaps(%s) WHERE kind <> 'empty'", (name,)).fetchall() == []


def test_a_bad_chunk_prefix_is_refused_by_name(articles):
    with pytest.raises(pipelines.PipelineError, match="invalid chunk_prefix expression"):
        pipelines.create(articles, "articles", "body", "hash:8", pipelines.PipelineOptions(chunk_prefix="nope"))
    with pytest.raises(pipelines.PipelineError, match="invalid chunk_prefix expression"):
        pipelines.create(articles, "articles", "body", "hash:8",
                         pipelines.PipelineOptions(chunk_prefix="title; DROP TABLE articles"))
