"""Late chunking (issue 13): each chunk's vector is its own tokens' states, pooled from one
run of the model over the whole document; a reference computed here with transformers
directly agrees with what the worker stored; plain and late vectors never share the
cache; a document longer than the window is read window by window; what cannot be late-
chunked is refused, nothing created."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import psycopg
import pytest
from typer.testing import CliRunner

from pgembed import pipelines
from pgembed.cli import app
from pgembed.providers.base import ModelSpec
from pgembed.providers.late import owners, windows
from pgembed.providers.local import LocalProvider, resolve_model
from tests.conftest import drain

MINILM = "local:all-MiniLM-L6-v2"
ABSTRACTS = [
    "Aspirin lowers the risk of a second heart attack. It does so by making platelets less sticky, "
    "so clots form more slowly. The effect lasts for the life of the platelet. Patients who stop "
    "taking it before surgery bleed less. Some trials found that the benefit outweighs the bleeding "
    "for people over sixty. Others found no such benefit in people who never had a heart attack.",
    "Lighthouses guided ships along dangerous coasts for centuries. Their keepers trimmed the wicks "
    "and wound the clockwork that turned the lens. Fresnel’s lens made the beam visible for twenty "
    "miles. Most lights are automatic now. The last keepers left in the nineteen-nineties, and "
    "many towers became museums, cafés or holiday homes.",
    "A short abstract, one chunk only.",
]
LATE = pipelines.PipelineOptions(chunk_tokens=24, chunk_overlap=0, late_chunking=True, name="late")
TOKENS = pipelines.PipelineOptions(chunking="tokens", chunk_tokens=24, chunk_overlap=4, late_chunking=True)
PLAIN = pipelines.PipelineOptions(chunk_tokens=24, chunk_overlap=0, name="plain")


@pytest.fixture(scope="module")
def reference():
    """all-MiniLM-L6-v2 through transformers itself: the tokens' last hidden states of a
    text cut at the model's window, and their character offsets."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model("all-MiniLM-L6-v2")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def states(text: str) -> tuple[np.ndarray, np.ndarray]:
        encoded = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=256,
                            return_tensors="pt")
        offsets = encoded.pop("offset_mapping")[0].numpy()
        with torch.inference_mode():
            hidden = model(**encoded).last_hidden_state[0].numpy()
        return hidden[1:-1], offsets[1:-1]  # without [CLS] and [SEP]
    return states


def pooled(states: np.ndarray, offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    inside = (offsets[:, 0] < end) & (offsets[:, 1] > start)
    mean = states[inside].mean(axis=0)
    return mean / np.linalg.norm(mean)


def spans(document: str, chunks: list[str]) -> list[tuple[int, int]]:
    """Where each stored chunk (verbatim, in order) lies in its document."""
    found, at = [], 0
    for chunk in chunks:
        start = document.index(chunk, at)
        found.append((start, start + len(chunk)))
        at = start + 1
    return found


@pytest.fixture
def abstracts(conn):
    conn.execute("CREATE TABLE abstracts (id int PRIMARY KEY, title text, body text)")
    for i, body in enumerate(ABSTRACTS):
        conn.execute("INSERT INTO abstracts VALUES (%s, %s, %s)", (i, f"Title {i}", body))
    return conn


def stored(conn, name: str) -> dict[tuple[int, int], tuple[str, bytes, np.ndarray]]:
    rows = conn.execute(f'SELECT id, chunk_seq, chunk, chunk_hash, embedding FROM pgembed."{name}"').fetchall()
    return {(i, seq): (chunk, bytes(h), v.to_numpy()) for i, seq, chunk, h, v in rows}


@pytest.mark.local_model
@pytest.mark.parametrize("options", [LATE, TOKENS], ids=["recursive", "tokens"])
def test_the_worker_stores_each_chunk_s_tokens_pooled_from_its_whole_document(abstracts, dsn, reference, options):
    name = pipelines.create(abstracts, "abstracts", "body", MINILM, options)
    drain(dsn, max_attempts=1)
    assert abstracts.execute("SELECT count(*) FROM pgembed.failures").fetchone() == (0,)
    rows = stored(abstracts, name)
    for i, body in enumerate(ABSTRACTS):
        chunks = [rows[k][0] for k in sorted(k for k in rows if k[0] == i)]
        assert len(chunks) > 2 or i == 2
        states, offsets = reference(body)
        for seq, (start, end) in enumerate(spans(body, chunks)):
            assert np.abs(rows[i, seq][2] - pooled(states, offsets, start, end)).max() < 1e-4
    # one request's usage: each document's tokens once ([CLS] and [SEP] included), a chunk an input
    inputs, tokens = abstracts.execute("SELECT sum(inputs), sum(tokens) FROM pgembed.usage").fetchone()
    assert inputs == len(rows)
    assert tokens == sum(len(offsets) + 2 for offsets in (reference(b)[1] for b in ABSTRACTS))


@pytest.mark.local_model
def test_a_chunk_prefix_is_read_once_at_the_head_of_the_document(abstracts, dsn, reference):
    options = pipelines.PipelineOptions(chunk_tokens=24, chunk_overlap=0, late_chunking=True,
                                        chunk_prefix="title")
    name = pipelines.create(abstracts, "abstracts", "body", MINILM, options)
    drain(dsn, max_attempts=1)
    rows = stored(abstracts, name)
    document = f"Title 0\n{ABSTRACTS[0]}"
    chunks = [rows[k][0] for k in sorted(k for k in rows if k[0] == 0)]
    assert all(c.startswith("Title 0\n") for c in chunks)  # stored as plain chunking stores them
    states, offsets = reference(document)
    own = [c.removeprefix("Title 0\n") for c in chunks]
    for seq, (start, end) in enumerate(spans(document, own)):
        assert np.abs(rows[0, seq][2] - pooled(states, offsets, start, end)).max() < 1e-4


@pytest.mark.local_model
def test_plain_and_late_chunked_vectors_of_the_same_text_never_share_the_cache(abstracts, dsn):
    late = pipelines.create(abstracts, "abstracts", "body", MINILM, LATE)
    plain = pipelines.create(abstracts, "abstracts", "body", MINILM, PLAIN)
    drain(dsn)
    late_rows, plain_rows = stored(abstracts, late), stored(abstracts, plain)
    assert {k: v[0] for k, v in late_rows.items()} == {k: v[0] for k, v in plain_rows.items()}  # same chunks
    for key, (_, late_hash, late_vector) in late_rows.items():
        _, plain_hash, plain_vector = plain_rows[key]
        assert late_hash != plain_hash
        assert float(late_vector @ plain_vector) < 0.999  # a different vector, even for a one-chunk row
    assert abstracts.execute("SELECT count(*) FROM pgembed.embedding_cache").fetchone() == (2 * len(late_rows),)
    # embedded again, each pipeline hits its own entries and keeps its vectors
    for name in (late, plain):
        abstracts.execute("SELECT pgembed.queue_all(%s, 'repair')", (name,))
    drain(dsn)
    hits, misses = abstracts.execute(
        "SELECT sum(cache_hits), sum(cache_misses) FROM pgembed.usage WHERE purpose = 'repair'").fetchone()
    assert (hits, misses) == (2 * len(late_rows), 0)
    for name, before in ((late, late_rows), (plain, plain_rows)):
        after = stored(abstracts, name)
        assert all(np.array_equal(after[k][2], before[k][2]) for k in before)


@pytest.mark.local_model
def test_a_document_longer_than_the_window_is_read_window_by_window(conn, dsn, reference):
    sentence = "Each sentence of this long report adds one more fact about the harbour and its ships. "
    long = "\n\n".join(sentence * 6 for _ in range(10))  # ~1,000 WordPiece tokens, four windows
    conn.execute("CREATE TABLE reports (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO reports VALUES (1, %s)", (long,))
    late = pipelines.create(conn, "reports", "body", MINILM, pipelines.PipelineOptions(late_chunking=True))
    plain = pipelines.create(conn, "reports", "body", MINILM, pipelines.PipelineOptions(name="plain"))
    drain(dsn, max_attempts=1)
    assert conn.execute("SELECT count(*) FROM pgembed.failures").fetchone() == (0,)
    late_rows, plain_rows = stored(conn, late), stored(conn, plain)
    assert len(late_rows) >= 5 and [v[0] for _, v in sorted(late_rows.items())] == \
        [v[0] for _, v in sorted(plain_rows.items())]
    # the first chunk lies in the first window's first three quarters: its states are that window's
    states, offsets = reference(long)
    start, end = spans(long, [late_rows[1, 0][0]])[0]
    assert np.abs(late_rows[1, 0][2] - pooled(states, offsets, start, end)).max() < 1e-4


def test_windows_overlap_by_half_and_each_token_reads_the_window_where_it_is_most_central():
    assert windows(100, 254) == [(0, 100)]
    ranges = windows(1000, 254)
    assert ranges[0] == (0, 254) and ranges[-1] == (746, 1000)
    assert all(b[0] - a[0] <= 127 for a, b in itertools.pairwise(ranges))
    who = owners(1000, ranges)
    for token, w in enumerate(who):
        start, end = ranges[w]
        assert start <= token < end
        # a quarter window of context on each side, short of the document's own ends
        assert min(token - start, end - 1 - token) >= min(254 // 4, token, 999 - token)


@pytest.mark.local_model
def test_the_torch_and_numpy_runtimes_late_chunk_alike(monkeypatch):
    spec = ModelSpec(MINILM, 384, 384, 256)
    document = ABSTRACTS[0] * 4  # past the window
    chunk_spans = [(i, i + 200) for i in range(0, len(document) - 200, 200)]
    vectors = {}
    for runtime in ("torch", "numpy"):
        monkeypatch.setenv("PGEMBED_LOCAL_RUNTIME", runtime)
        result = asyncio.run(LocalProvider(spec).embed_late([(document, chunk_spans)]))
        assert result.errors == [None] * len(chunk_spans)
        vectors[runtime] = np.array(result.vectors)
    assert np.abs(vectors["torch"] - vectors["numpy"]).max() < 1e-5


@pytest.mark.parametrize(("model", "options", "message"), [
    ("hash:8", {}, "late chunking needs a local: model, not 'hash:8'"),
    (MINILM, {"chunking": "none"}, "chunking 'none' keeps one"),
    (MINILM, {"chunking": "truncate"}, "chunking 'truncate' keeps one"),
])
def test_what_cannot_be_late_chunked_is_refused_and_nothing_is_created(abstracts, model, options, message):
    with pytest.raises(pipelines.PipelineError, match=message):
        pipelines.create(abstracts, "abstracts", "body", model,
                         pipelines.PipelineOptions(late_chunking=True, **options))
    assert abstracts.execute("SELECT count(*) FROM pgembed.pipelines").fetchone() == (0,)
    assert abstracts.execute("SELECT count(*) FROM pgembed.outbox").fetchone() == (0,)
    assert abstracts.execute("SELECT to_regclass('pgembed.abstracts_minilm')").fetchone() == (None,)


def test_late_chunking_null_is_refused(abstracts):
    with pytest.raises(psycopg.errors.RaiseException, match="late_chunking must be true or false"):
        abstracts.execute("SELECT pgembed.create_pipeline('abstracts', 'body', %s, late_chunking => NULL)",
                          (MINILM,))
    assert abstracts.execute("SELECT count(*) FROM pgembed.pipelines").fetchone() == (0,)


def test_the_command_line_creates_a_late_chunked_pipeline_and_refuses_one_it_cannot(abstracts, dsn):
    runner = CliRunner()
    refused = runner.invoke(app, ["pipeline", "create", "abstracts", "body", "--model", "hash:8",
                                  "--late-chunking", "--dsn", dsn])
    # exit 1, as for every refusal of create_pipeline (tests/test_cli.py)
    assert refused.exit_code == 1 and "late chunking needs a local: model" in refused.output
    assert "Traceback" not in refused.output
    created = runner.invoke(app, ["pipeline", "create", "abstracts", "body", "--model", MINILM,
                                  "--late-chunking", "--dsn", dsn])
    assert created.exit_code == 0, created.output
    assert abstracts.execute("SELECT late_chunking FROM pgembed.pipelines").fetchall() == [(True,)]
