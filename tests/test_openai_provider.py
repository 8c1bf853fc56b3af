"""OpenAIProvider against a real HTTP server, through the real openai client (no mocks).

Retry waits go through a recording `sleep`, so the tests check what the provider decided
to wait (the server's Retry-After, or a backoff) without waiting it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pgembed.providers import make_provider
from pgembed.providers.base import EmbedResult, ModelSpec, ProviderError
from pgembed.providers.hashing import hash_vector
from pgembed.providers.openai import OpenAIProvider
from pgembed.tokens import count_tokens
from tests.fakeapi import FakeAPI, fake_token_count

KEY = "sk-test-7Hq2secretKEYvalue0123456789"
TINY = ModelSpec("openai:tiny", dimensions=8, native_dimensions=8)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    with FakeAPI(dimensions={"tiny": 8}) as server:
        yield server


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own OpenAI settings must not leak into the tests."""
    for name in list(os.environ):
        if name.startswith(("PGEMBED_OPENAI_", "OPENAI_")):
            monkeypatch.delenv(name)


class Waits(list[float]):
    """A retry `sleep` that records the wait instead of waiting."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


Run = Callable[..., EmbedResult]


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def embed(api: FakeAPI, waits: Waits) -> Run:
    """Embed `texts` with a fresh provider (fast retries), closing it afterwards."""

    def run(texts: list[str], spec: ModelSpec = TINY, **options: Any) -> EmbedResult:
        settings: dict[str, Any] = {
            "api_key": KEY,
            "base_url": api.base_url,
            "timeout": 5.0,
            "backoff_base": 0.01,
            "backoff_max": 0.05,
            "sleep": waits,
        }
        settings.update(options)

        async def go() -> EmbedResult:
            async with OpenAIProvider(spec, **settings) as provider:
                return await provider.embed(texts)

        return asyncio.run(go())

    return run


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def assert_exclusive(result: EmbedResult) -> None:
    """Every input has exactly one of a vector or an error."""
    assert len(result.vectors) == len(result.errors)
    for vector, error in zip(result.vectors, result.errors, strict=True):
        assert (vector is None) != (error is None)


def assert_hash_vectors(result: EmbedResult, texts: list[str], dims: int) -> None:
    for text, vector in zip(texts, result.vectors, strict=True):
        assert vector is not None
        assert len(vector) == dims
        assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(vector, hash_vector(text, dims), strict=True))


# --------------------------------------------------------------------- happy path


def test_a_big_batch_is_counted_and_sent_whole(api: FakeAPI, embed: Run) -> None:
    texts = [f"{i} " + "lorem ipsum dolor sit amet " * 40 for i in range(300)]  # > 200k chars
    result = embed(texts)
    assert result.errors == [None] * 300
    assert result.token_counts == [count_tokens(t) for t in texts]
    assert result.requests == 1


def test_vectors_come_back_in_input_order_with_accounting(api: FakeAPI, embed: Run) -> None:
    api.reverse_data = True  # `index` decides the order, not the position in `data`
    texts = [f"text number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(10)]
    result = embed(texts)
    assert result.errors == [None] * 10
    assert_hash_vectors(result, texts, 8)
    assert result.requests == 1 and result.inputs_sent == 10
    assert result.tokens == sum(fake_token_count(t) for t in texts)  # the API's usage
    assert result.token_counts == [count_tokens(t) for t in texts]  # our own count
    assert api.log[0]["encoding_format"] == "base64"
    assert api.log[0]["dimensions"] is None
    assert api.log[0]["model"] == "tiny"


def test_float_encoding_is_also_understood(api: FakeAPI, embed: Run) -> None:
    """Some compatible servers ignore encoding_format and send floats."""
    api.floats_only = True
    api.reverse_data = True
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    result = embed(texts)
    assert api.log[0]["encoding_format"] == "base64"  # asked for, and ignored
    assert_hash_vectors(result, texts, 8)
    assert result.tokens == sum(fake_token_count(t) for t in texts)  # usage read too


def test_no_texts_no_requests(api: FakeAPI, embed: Run) -> None:
    result = embed([])
    assert result.vectors == [] and result.requests == 0
    assert api.requests == 0


def test_batches_respect_max_batch_inputs(api: FakeAPI, embed: Run) -> None:
    spec = ModelSpec("openai:tiny", 8, 8, max_batch_inputs=4)
    texts = [f"t{i}" for i in range(10)]
    result = embed(texts, spec)
    assert_hash_vectors(result, texts, 8)
    assert result.requests == api.requests == 3
    assert sorted(len(entry["input"]) for entry in api.log) == [2, 4, 4]


def test_batches_respect_max_batch_tokens(api: FakeAPI, embed: Run) -> None:
    limit = 20
    spec = ModelSpec("openai:tiny", 8, 8, max_batch_tokens=limit)
    texts = [" ".join(["cat"] * n) for n in (3, 10, 7, 12, 1, 9, 15, 4)]
    assert max(map(count_tokens, texts)) <= limit < sum(map(count_tokens, texts))
    result = embed(texts, spec)
    assert_hash_vectors(result, texts, 8)
    for entry in api.log:
        assert sum(count_tokens(t) for t in entry["input"]) <= limit
    assert sorted(api.received) == sorted(texts)  # each text sent exactly once
    assert result.requests == api.requests > 1


def test_requests_run_concurrently_but_bounded(api: FakeAPI, embed: Run) -> None:
    api.latency(0.1)
    spec = ModelSpec("openai:tiny", 8, 8, max_batch_inputs=1)
    result = embed([f"t{i}" for i in range(8)], spec, concurrency=3)
    assert result.requests == 8
    assert 1 < api.max_in_flight <= 3


# ------------------------------------------------------------------------ retries


def test_429_waits_as_the_retry_after_header_says(api: FakeAPI, embed: Run, waits: Waits) -> None:
    api.fail_next(2, status=429, retry_after=0.25)
    result = embed(["a", "b"])
    assert result.errors == [None, None]
    assert waits == [0.25, 0.25]  # retry-after-ms, not our (tiny) backoff
    assert result.requests == 3 and result.inputs_sent == 6
    assert api.statuses == {429: 2, 200: 1}


def test_retry_after_is_capped_by_max_wait(api: FakeAPI, embed: Run, waits: Waits) -> None:
    api.fail_next(1, status=429, retry_after=120)
    result = embed(["a"], max_wait=2.0)
    assert result.errors == [None]
    assert waits == [2.0]


def test_500_then_success_backs_off(api: FakeAPI, embed: Run, waits: Waits) -> None:
    api.fail_next(2, status=500)
    result = embed(["a", "b"])
    assert result.errors == [None, None]
    assert result.requests == 3
    assert len(waits) == 2 and all(0 < w <= 0.05 for w in waits)


def test_timeout_then_success(api: FakeAPI, embed: Run) -> None:
    api.hang(1, seconds=10)
    texts = ["slow one", "slow two"]
    result = embed(texts, timeout=0.3)
    assert_hash_vectors(result, texts, 8)
    assert result.requests == 2


def test_exhausted_retries_raise_a_clear_provider_error(api: FakeAPI, embed: Run) -> None:
    api.fail_next(100, status=503)
    with pytest.raises(ProviderError) as caught:
        embed(["a", "b"], max_attempts=3)
    message = str(caught.value)
    assert "HTTP 503" in message and "after 3 attempt" in message
    assert "The server had an error processing your request." in message
    assert "\n" not in message and KEY not in message
    assert api.requests == 3


def test_exhausted_timeouts(api: FakeAPI, embed: Run) -> None:
    api.hang(5, seconds=10)
    with pytest.raises(ProviderError, match=r"timed out after 0\.2s"):
        embed(["a"], timeout=0.2, max_attempts=2)
    assert api.requests == 2


def test_the_timeout_is_per_request_in_total_not_per_read(api: FakeAPI, embed: Run,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that trickles its answer a few bytes at a time never makes one read wait
    long: PGEMBED_OPENAI_TIMEOUT still abandons the request once it has taken that long."""
    monkeypatch.setenv("PGEMBED_OPENAI_TIMEOUT", "1")
    api.trickle(5, seconds=8)
    started = time.monotonic()
    with pytest.raises(ProviderError, match=r"timed out after 1s"):
        embed(["a"], timeout=None, max_attempts=2)
    assert time.monotonic() - started < 5
    assert api.requests == 2
    api.trickle(1, seconds=0.3)  # a slow answer within the timeout is fine
    assert_hash_vectors(embed(["b"], timeout=None), ["b"], 8)


def test_connection_refused_is_retried_then_reported(embed: Run, waits: Waits) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ProviderError, match="connection error"):
        embed(["a"], base_url=f"http://127.0.0.1:{port}/v1", max_attempts=3)
    assert len(waits) == 2


def test_wrong_key_fails_at_once_without_showing_it() -> None:
    with FakeAPI(api_key="sk-the-right-one-abcdef", dimensions={"tiny": 8}) as server:

        async def go() -> None:
            async with OpenAIProvider(TINY, api_key=KEY, base_url=server.base_url) as p:
                await p.embed(["a"])

        with pytest.raises(ProviderError, match="HTTP 401") as caught:
            asyncio.run(go())
        assert server.requests == 1  # a 401 is not retried
    shown = "".join(traceback.format_exception(caught.value))
    assert KEY not in shown and KEY[:12] not in shown
    assert "Incorrect API key provided" in shown


# ----------------------------------------------------------------- bad inputs


def test_one_rejected_input_in_64_is_isolated(api: FakeAPI, embed: Run) -> None:
    api.always_reject("POISON", message="Invalid 'input[37]': this input is not allowed.")
    texts = [f"row {i} text" for i in range(64)]
    texts[37] = "row 37 POISON"
    result = embed(texts)
    assert_exclusive(result)
    assert [i for i, e in enumerate(result.errors) if e] == [37]
    assert "Invalid 'input[37]': this input is not allowed." in (result.errors[37] or "")
    good = [t for i, t in enumerate(texts) if i != 37]
    assert_hash_vectors(EmbedResult([v for v in result.vectors if v is not None], []), good, 8)
    assert result.requests == api.requests <= 1 + 2 * 6 + 2
    assert result.tokens == sum(fake_token_count(t) for t in good)  # rejections are free


def test_two_rejected_inputs_are_both_isolated(api: FakeAPI, embed: Run) -> None:
    api.always_reject("BAD")
    texts = [f"ok {i}" for i in range(32)]
    texts[3], texts[29] = "BAD three", "BAD twenty-nine"
    result = embed(texts)
    assert_exclusive(result)
    assert [i for i, e in enumerate(result.errors) if e] == [3, 29]
    assert all("rejected by the API (HTTP 400)" in (result.errors[i] or "") for i in (3, 29))


def test_request_level_rejection_does_not_cost_a_request_per_input(api: FakeAPI, embed: Run) -> None:
    """ada-002 refuses `dimensions`: every request fails, splitting must stop early."""
    spec = ModelSpec("openai:text-embedding-ada-002", dimensions=256, native_dimensions=1536)
    result = embed([f"t{i}" for i in range(64)], spec)
    assert result.vectors == [None] * 64
    assert all("does not support specifying dimensions" in (e or "") for e in result.errors)
    assert api.requests < 64


def test_empty_and_over_limit_texts_are_not_sent(api: FakeAPI, embed: Run) -> None:
    spec = ModelSpec("openai:tiny", 8, 8, max_input_tokens=5)
    long_text = words(20)
    result = embed(["", "  \n\t", long_text, "fine"], spec)
    assert result.errors[:2] == ["empty text", "empty text"]
    n = count_tokens(long_text)
    assert result.errors[2] == f"input has {n} tokens, over the model's limit of 5"
    assert result.errors[3] is None and result.vectors[3] is not None
    assert api.received == ["fine"]
    assert result.inputs_sent == 1


def test_only_bad_texts_make_no_request(api: FakeAPI, embed: Run) -> None:
    result = embed(["", " "])
    assert result.errors == ["empty text", "empty text"]
    assert result.requests == 0 and api.requests == 0


# ------------------------------------------------------------- bad responses


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("wrong_dims", "provider returned 11 dimensions, expected 8"),
        ("wrong_count", "returned 2 embeddings for 3 inputs"),
        ("empty_data", "no embeddings"),
        ("not_json", "not a JSON embeddings response"),
    ],
)
@pytest.mark.parametrize("floats_only", [False, True], ids=["base64", "floats"])
def test_malformed_answers_become_errors_never_vectors(
    api: FakeAPI, embed: Run, kind: str, expected: str, floats_only: bool
) -> None:
    api.floats_only = floats_only
    api.garbage(kind)
    result = embed(["a", "b", "c"])
    assert result.vectors == [None, None, None]
    assert all(expected in (e or "") for e in result.errors), result.errors
    assert result.requests == 1  # answered, so not retried: the worker retries later


@pytest.mark.parametrize("floats_only", [False, True], ids=["base64", "floats"])
def test_nan_spoils_only_its_own_vector(api: FakeAPI, embed: Run, floats_only: bool) -> None:
    api.floats_only = floats_only
    api.garbage("nan")
    result = embed(["a", "b", "c"])
    assert result.vectors[0] is None
    assert "NaN or Infinity" in (result.errors[0] or "")
    assert_hash_vectors(EmbedResult(result.vectors[1:], []), ["b", "c"], 8)


# ---------------------------------------------------------------- configuration


def test_dimensions_sent_only_when_they_differ_from_native(api: FakeAPI, embed: Run) -> None:
    short = ModelSpec("openai:text-embedding-3-small", dimensions=256, native_dimensions=1536)
    full = ModelSpec("openai:text-embedding-3-small", dimensions=1536, native_dimensions=1536)
    assert embed(["hello"], short).vectors[0] is not None
    vector = embed(["hello"], full).vectors[0]
    assert vector is not None and len(vector) == 1536
    assert [e["dimensions"] for e in api.log] == [256, None]
    assert [e["model"] for e in api.log] == ["text-embedding-3-small"] * 2


def test_missing_api_key_names_the_variable() -> None:
    with pytest.raises(ProviderError, match="PGEMBED_OPENAI_API_KEY or OPENAI_API_KEY"):
        OpenAIProvider(TINY)


def test_settings_come_from_the_environment(api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("PGEMBED_OPENAI_BASE_URL", api.base_url)
    monkeypatch.setenv("PGEMBED_OPENAI_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("PGEMBED_OPENAI_BACKOFF_BASE", "0.001")
    monkeypatch.setenv("PGEMBED_OPENAI_BACKOFF_MAX", "0.001")
    api.fail_next(5, status=500)

    async def go() -> None:
        provider = make_provider(TINY)
        assert isinstance(provider, OpenAIProvider)
        try:
            with pytest.raises(ProviderError, match="after 2 attempt"):
                await provider.embed(["a"])
        finally:
            await provider.aclose()

    asyncio.run(go())
    assert api.requests == 2


def test_a_bad_setting_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGEMBED_OPENAI_TIMEOUT", "soon")
    with pytest.raises(ProviderError, match="PGEMBED_OPENAI_TIMEOUT='soon'"):
        OpenAIProvider(TINY, api_key=KEY)


# ------------------------------------------------------------- fake as a process


def _http(url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_fake_api_runs_as_a_process_and_is_controlled_over_http() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakeapi", "--port", "0", "--dimensions", "8"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        base_url = line.rsplit(" ", 1)[-1].strip()
        root = base_url.removesuffix("/v1")
        _http(f"{root}/_control", {"fail_next": {"n": 1, "status": 429, "retry_after": 0.01}})

        async def go() -> EmbedResult:
            async with OpenAIProvider(TINY, api_key=KEY, base_url=base_url) as provider:
                return await provider.embed(["over http"])

        result = asyncio.run(go())
        assert_hash_vectors(result, ["over http"], 8)
        stats = _http(f"{root}/_stats")
        assert stats["requests"] == 2 and stats["statuses"] == {"200": 1, "429": 1}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    assert process.returncode == 0


def test_the_check_loads_the_tokenizer_before_any_batch_needs_it(api: FakeAPI) -> None:
    """A worker checks its providers before it announces ready: the first row must not wait
    for the tokenizer to load."""
    from pgembed import tokens

    tokens.encoding.cache_clear()
    provider = OpenAIProvider(ModelSpec("openai:tiny", 8, 8), api_key="sk-test", base_url=api.base_url)
    asyncio.run(provider.check())
    assert tokens.encoding.cache_info().currsize == 1
    assert api.requests == 0  # checked without a request: one would cost
