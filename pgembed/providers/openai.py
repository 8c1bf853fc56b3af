"""`openai:NAME` — OpenAI's embeddings API, or any server that speaks it.

Azure OpenAI, vLLM, TEI, Ollama and LM Studio are reached through the base URL. Settings
come from the environment, so that keys never touch the database:

* `PGEMBED_OPENAI_API_KEY` or `OPENAI_API_KEY`: the bearer key, required (any non-empty
  value for a server that needs none).
* `PGEMBED_OPENAI_BASE_URL` or `OPENAI_BASE_URL`: the API root, e.g.
  `http://localhost:11434/v1`; OpenAI's when unset.
* `PGEMBED_OPENAI_TIMEOUT`: seconds per HTTP request, in total (60): a server that sends
  its answer a trickle at a time is abandoned then too (a timed-out attempt is retried).
* `PGEMBED_OPENAI_CONCURRENCY`: HTTP requests in flight per provider (4), for a provider
  made on its own (search, the Python client); a worker gives its `--concurrency` instead.
* `PGEMBED_OPENAI_MAX_ATTEMPTS`: attempts per request, the first included (6).
* `PGEMBED_OPENAI_BACKOFF_BASE` / `PGEMBED_OPENAI_BACKOFF_MAX`: exponential backoff in
  seconds (0.5 / 20).
* `PGEMBED_OPENAI_MAX_WAIT`: cap on any one wait, `Retry-After` included (60).

What happens to a call:

* Inputs are checked first: empty or whitespace-only text, or text over the model's token
  limit, gets an error and is never sent (an API would reject it, and the whole batch
  with it).
* The rest is packed, in order, into requests within `max_batch_inputs` and
  `max_batch_tokens` (counted with `pgembed.tokens.count_tokens`), sent concurrently.
* Transient failures (429, 408, 409, 5xx, timeouts, connection errors) are retried by
  tenacity with exponential backoff and jitter, or after the server's `retry-after-ms` /
  `Retry-After`. When the attempts run out, `ProviderError` is raised: the whole call is
  untrustworthy and the caller retries it later. Other statuses (401, 403, 404, ...) are a
  configuration problem and raise `ProviderError` at once.
* A request refused for its content (400, 413, 422) is split in halves until the bad
  inputs are isolated: each gets the API's message, the others are embedded. One bad
  input in a batch of n costs 2·log2(n) extra requests. Splitting has a budget per batch
  (so that a request-level 400, e.g. an unsupported `dimensions`, does not cost 2n
  requests): past it, the group being split gets the API's message as a whole.
* A malformed success (body not JSON, no `data`, a vector count different from the
  input count, bad `index` values) is NOT retried: the server answered, and asking again
  usually gets the same answer, so every input of that request gets an error and the
  worker's failure path retries them later, with its own backoff. A vector with the
  wrong size or NaN/Infinity is an error for its input alone.

* With a `limiter` (a `RateLimiter`, e.g. `pgembed.ratelimit.BucketLimiter`), every HTTP
  request, each retry included, first acquires one request and its tokens (as counted
  here) from the budget shared by everyone using the key, waiting while it is spent. The
  wait happens inside the concurrency bound, right before the request goes out, so that
  what the API sees stays within the budget. A limiter that cannot be consulted fails the
  call with `ProviderError`. Without a limiter nothing changes.
* A limiter that learns (`LearnsLimits`, as `BucketLimiter` does) is shown what each answer's
  rate-limit headers say (`x-ratelimit-limit-/remaining-/reset-requests` and `-tokens`,
  429s included), so that the shared budget slows down when the API says fewer remain.

The API key never appears in an error message: messages echoed from the API are redacted.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import json
import math
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from pgembed.providers.base import EmbedResult, ModelSpec, ProviderError, RateLimiter, vector_problem
from pgembed.providers.response import decode, field, ordered_items, read_body
from pgembed.tokens import count_all, count_tokens

try:  # the openai client's HTTP library (httpx2 since openai 3): its response has the headers
    from httpx2 import Response as _HttpResponse
except ImportError:  # pragma: no cover - older openai clients
    from httpx import Response as _HttpResponse  # type: ignore[assignment,no-redef]

KEY_VARIABLES = ("PGEMBED_OPENAI_API_KEY", "OPENAI_API_KEY")
URL_VARIABLES = ("PGEMBED_OPENAI_BASE_URL", "OPENAI_BASE_URL")

_TRANSIENT_STATUS = frozenset({408, 409, 429})
_REJECT_STATUS = frozenset({400, 413, 422})
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*]{3,}")

Sleep = Callable[[float], Awaitable[None]]


class _Rejected(Exception):
    """The API refused a request because of what was in it: split and try again."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _TotalTimeout(Exception):
    """A request that took longer than the timeout in all: transient, as the client's own
    timeouts are."""


@dataclass
class _Run:
    """What one `embed` call has gathered so far; tasks share it on one event loop."""

    vectors: list[list[float] | np.ndarray | None]
    errors: list[str | None]
    token_counts: list[int]
    tokens: int = 0
    requests: int = 0
    inputs_sent: int = 0

    def result(self) -> EmbedResult:
        return EmbedResult(
            vectors=self.vectors,
            errors=self.errors,
            tokens=self.tokens,
            requests=self.requests,
            inputs_sent=self.inputs_sent,
            token_counts=self.token_counts,
        )


@dataclass
class _SplitBudget:
    """How many more rejected requests one batch may cost while isolating bad inputs."""

    remaining: int

    @classmethod
    def for_batch(cls, size: int) -> _SplitBudget:
        # Enough to isolate about four bad inputs anywhere in the batch.
        return cls(remaining=8 * max(1, math.ceil(math.log2(max(size, 2)))) + 8)


class OpenAIProvider:
    """Embeds texts through the openai client; see the module docstring for the rules.

    Every keyword argument overrides its environment variable; `sleep` replaces the
    retry sleep (tests record waits without waiting), `token_counter` the tokenizer;
    `limiter` is the shared rate-limit budget, asked before every HTTP request.
    """

    #: its `concurrency` (the worker's --concurrency) bounds the requests in flight, each with
    #: its retries: the worker does not hold a slot while tokens are counted or vectors decoded
    bounds_requests = True

    def __init__(
        self,
        spec: ModelSpec,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float | None = None,
        concurrency: int | None = None,
        max_attempts: int | None = None,
        backoff_base: float | None = None,
        backoff_max: float | None = None,
        max_wait: float | None = None,
        sleep: Sleep | None = None,
        token_counter: Callable[[str], int] | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.spec = spec
        self.limiter = limiter
        key = api_key or _first_env(KEY_VARIABLES)
        if not key:
            raise ProviderError(
                f"no API key for {spec.model}: set {KEY_VARIABLES[0]} or {KEY_VARIABLES[1]} "
                "(any non-empty value for a server that needs none)"
            )
        self._key = key
        self.timeout = _setting(timeout, "PGEMBED_OPENAI_TIMEOUT", 60.0)
        self.concurrency = int(_setting(concurrency, "PGEMBED_OPENAI_CONCURRENCY", 4))
        self.max_attempts = int(_setting(max_attempts, "PGEMBED_OPENAI_MAX_ATTEMPTS", 6))
        self.backoff_base = _setting(backoff_base, "PGEMBED_OPENAI_BACKOFF_BASE", 0.5)
        self.backoff_max = _setting(backoff_max, "PGEMBED_OPENAI_BACKOFF_MAX", 20.0)
        self.max_wait = _setting(max_wait, "PGEMBED_OPENAI_MAX_WAIT", 60.0)
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ProviderError("PGEMBED_OPENAI_CONCURRENCY and _MAX_ATTEMPTS must be >= 1")
        self._sleep: Sleep = asyncio.sleep if sleep is None else sleep
        self._count = token_counter or count_tokens
        self._slots = asyncio.Semaphore(self.concurrency)
        self._client = openai.AsyncOpenAI(
            api_key=key,
            base_url=base_url or _first_env(URL_VARIABLES) or None,
            timeout=self.timeout,
            max_retries=0,  # tenacity retries, with our limits and our accounting
        )

    def with_limiter(self, limiter: RateLimiter | None) -> OpenAIProvider:
        """This provider spending from another budget (the bulk lane's share): the same
        client and the same request slots, so that --concurrency bounds both together."""
        other = copy.copy(self)
        other.limiter = limiter
        return other

    async def __aenter__(self) -> OpenAIProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def check(self) -> None:
        """Whether this provider can work, before anything is claimed for it: the key and
        the settings were checked when it was made; nothing is sent (a request would cost).
        The tokenizer is loaded now (~0.5 s, off the event loop), not on the first batch,
        whose rows would wait for it."""
        await asyncio.to_thread(self._count, "warm-up")

    async def aclose(self) -> None:
        await self._client.close()

    # ------------------------------------------------------------------ embedding

    async def embed(self, texts: list[str]) -> EmbedResult:
        """One vector or one error per input, in input order; raises only ProviderError."""
        counts = await count_all(texts, self._count)
        run = _Run(vectors=[None] * len(texts), errors=[None] * len(texts), token_counts=counts)
        sendable = []
        for i, (text, tokens) in enumerate(zip(texts, counts, strict=True)):
            problem = self._input_problem(text, tokens)
            if problem is None:
                sendable.append(i)
            else:
                run.errors[i] = problem
        batches = self._batches(sendable, counts)
        await _gather(self._embed_group(batch, texts, run, _SplitBudget.for_batch(len(batch))) for batch in batches)
        return run.result()

    def _input_problem(self, text: str, tokens: int) -> str | None:
        if not text.strip():
            return "empty text"
        limit = self.spec.max_input_tokens
        if tokens > limit:
            return f"input has {tokens} tokens, over the model's limit of {limit}"
        return None

    def _batches(self, indices: list[int], counts: list[int]) -> list[list[int]]:
        """Greedy, order-preserving packing under both of the API's per-request limits."""
        batches: list[list[int]] = []
        current: list[int] = []
        tokens = 0
        for i in indices:
            full = len(current) >= self.spec.max_batch_inputs
            if current and (full or tokens + counts[i] > self.spec.max_batch_tokens):
                batches.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += counts[i]
        if current:
            batches.append(current)
        return batches

    async def _embed_group(self, indices: list[int], texts: list[str], run: _Run, budget: _SplitBudget) -> None:
        """Embed one request's worth; on a content rejection, bisect to find the culprits."""
        tokens = sum(run.token_counts[i] for i in indices)
        try:
            # a request slot is held through the request's retries and their backoff (a 429
            # slows this worker down, not only this request), not while its halves are tried
            async with self._slots:
                response = await self._request([texts[i] for i in indices], tokens, run)
        except _Rejected as rejected:
            if len(indices) == 1 or budget.remaining <= 0:
                note = (
                    ""
                    if len(indices) == 1
                    else (
                        f" (a request of {len(indices)} inputs was rejected; "
                        "too many rejections in this batch to isolate the bad input)"
                    )
                )
                for i in indices:
                    run.errors[i] = rejected.message + note
                return
            budget.remaining -= 2
            half = len(indices) // 2
            await _gather(self._embed_group(part, texts, run, budget) for part in (indices[:half], indices[half:]))
            return
        self._store(indices, response, run)

    async def _request(self, texts: list[str], tokens: int, run: _Run) -> Any:
        """One logical request: retried while transient, ProviderError when it gives up."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(_is_transient),
            sleep=self._sleep,
            reraise=True,
        )
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    return await self._post(texts, tokens, run)
        except (openai.APIError, _TotalTimeout) as exc:
            raise ProviderError(self._failure_message(exc, attempts)) from None
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _post(self, texts: list[str], tokens: int, run: _Run) -> Any:
        """Exactly one HTTP request, within the budget, counted (its caller holds a slot)."""
        params: dict[str, Any] = {
            "model": self.spec.name,
            "input": texts,
            # Asked for explicitly, so that the response is ours to decode and check.
            "encoding_format": "base64",
        }
        if self.spec.dimensions != self.spec.native_dimensions:
            params["dimensions"] = self.spec.dimensions
        if self.limiter is not None:
            await self._acquire(tokens)
        run.requests += 1
        run.inputs_sent += len(texts)
        try:
            # The client's own POST (auth, base URL, timeouts, its errors), read as JSON
            # here: typing the body into models took a tenth of an API-bound worker's
            # time, all for fields we check ourselves.
            response = await self._post_within_timeout(params)
            self._learn(response.headers)
            return read_body(response.content)
        except openai.APIStatusError as exc:
            self._learn(exc.response.headers)
            if exc.status_code in _REJECT_STATUS:
                raise _Rejected(f"rejected by the API (HTTP {exc.status_code}): {self._api_message(exc)}") from None
            raise
        except (json.JSONDecodeError, UnicodeDecodeError):
            # The client could not read the body (declared JSON, but it is not).
            return "<unreadable body>"

    async def _post_within_timeout(self, params: dict[str, Any]) -> _HttpResponse:
        """The POST, abandoned after `timeout` seconds in total. The client's own timeout is
        per read: a server that trickles its answer a few bytes at a time never trips it.
        The response itself (read already), for its headers as well as its body."""
        post = self._client.post("/embeddings", body=params, cast_to=_HttpResponse)
        if not self.timeout:
            return await post
        try:
            async with asyncio.timeout(self.timeout):
                return await post
        except TimeoutError:
            raise _TotalTimeout() from None

    async def _acquire(self, tokens: int) -> None:
        """Wait for the shared budget to allow one request of `tokens` tokens."""
        assert self.limiter is not None
        try:
            await self.limiter.acquire(1, tokens)
        except ProviderError:
            raise
        except Exception as exc:
            raise ProviderError(f"{self.spec.model}: rate limiter failed: {self._redact(str(exc))}") from None

    def _learn(self, headers: Mapping[str, str]) -> None:
        """Show the limiter what the API said of its rate limits, if it learns from that."""
        if isinstance(self.limiter, LearnsLimits):
            seen = ApiLimits.from_headers(headers)
            if seen is not None:
                self.limiter.observe(seen)

    def _wait(self, state: RetryCallState) -> float:
        """The server's Retry-After when it gives one, else backoff with equal jitter."""
        exc = state.outcome.exception() if state.outcome is not None else None
        hinted = _retry_after(exc)
        if hinted is not None:
            return min(max(hinted, 0.0), self.max_wait)
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (state.attempt_number - 1))
        return min(ceiling / 2 + random.uniform(0, ceiling / 2), self.max_wait)

    # ------------------------------------------------------------------- results

    def _store(self, indices: list[int], response: Any, run: _Run) -> None:
        """Put each vector (or why it is unusable) in its input's place."""
        counts = [run.token_counts[i] for i in indices]
        usage = field(field(response, "usage"), "prompt_tokens")
        run.tokens += usage if isinstance(usage, int) and usage >= 0 else sum(counts)
        items, problem = ordered_items(response, len(indices))
        if problem is not None:
            for i in indices:
                run.errors[i] = problem
            return
        for i, item in zip(indices, items, strict=True):
            vector, problem = decode(field(item, "embedding"))
            if problem is None and vector is not None:
                problem = vector_problem(vector, self.spec.dimensions)
            if problem is None:
                run.vectors[i] = vector
            else:
                run.errors[i] = problem

    # ------------------------------------------------------------------ messages

    def _api_message(self, exc: openai.APIError) -> str:
        """The API's own words (`error.message`), on one line, with any key redacted."""
        body = exc.body
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, str) or not message:
            message = body if isinstance(body, str) and body else exc.message
        return self._redact(" ".join(str(message).split())[:500])

    def _failure_message(self, exc: openai.APIError | _TotalTimeout, attempts: int) -> str:
        where = f"{self.spec.model}: embeddings request"
        if isinstance(exc, openai.APITimeoutError | _TotalTimeout):
            what = f"timed out after {self.timeout:g}s"
        elif isinstance(exc, openai.APIConnectionError):
            what = f"connection error: {self._api_message(exc)}"
        elif isinstance(exc, openai.APIStatusError):
            what = f"HTTP {exc.status_code}: {self._api_message(exc)}"
        else:
            what = self._api_message(exc)
        if _is_transient(exc):
            return f"{where} failed after {attempts} attempt(s): {what}"
        return f"{where} failed: {what}"

    def _redact(self, text: str) -> str:
        if self._key:
            text = text.replace(self._key, "***")
        return _KEY_LIKE.sub("sk-***", text)


# ----------------------------------------------------------------------- helpers


def client_from_env(timeout: float | None = None) -> openai.AsyncOpenAI:
    """A client with the provider's key, base URL and timeout, for the calls that are not
    embeddings (the Batch API's files and batches: pgembed.batch_api)."""
    key = _first_env(KEY_VARIABLES)
    if not key:
        raise ProviderError(f"no API key: set {KEY_VARIABLES[0]} or {KEY_VARIABLES[1]}")
    return openai.AsyncOpenAI(api_key=key, base_url=_first_env(URL_VARIABLES) or None,
                              timeout=_setting(timeout, "PGEMBED_OPENAI_TIMEOUT", 60.0), max_retries=3)


def _first_env(names: Iterable[str]) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _setting(given: float | None, variable: str, default: float) -> float:
    """A constructor argument, else the environment variable, else the default."""
    if given is not None:
        return float(given)
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ProviderError(f"{variable}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ProviderError(f"{variable}={raw!r} must be a finite number >= 0")
    return value


# ------------------------------------------------------------- rate-limit headers


@dataclass(frozen=True)
class ApiLimits:
    """What one answer's rate-limit headers said, as OpenAI sends them: the limit, what
    remains of it and in how many seconds that resets, for requests and for tokens (None:
    not sent, or not readable)."""

    requests_limit: int | None = None
    requests_remaining: int | None = None
    requests_reset: float | None = None
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    tokens_reset: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ApiLimits | None:
        """None when the answer says nothing of what remains (most compatible servers)."""
        requests = headers.get("x-ratelimit-remaining-requests")
        tokens = headers.get("x-ratelimit-remaining-tokens")
        if requests is None and tokens is None:
            return None
        seen = cls(_count(headers.get("x-ratelimit-limit-requests")), _count(requests),
                   parse_reset(headers.get("x-ratelimit-reset-requests")),
                   _count(headers.get("x-ratelimit-limit-tokens")), _count(tokens),
                   parse_reset(headers.get("x-ratelimit-reset-tokens")))
        return None if seen.requests_remaining is None and seen.tokens_remaining is None else seen


@runtime_checkable
class LearnsLimits(Protocol):
    """A `RateLimiter` that also learns from what the API says of its limits."""

    def observe(self, seen: ApiLimits) -> None: ...


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_reset(text: str | None) -> float | None:
    """Seconds in a reset header: a duration as OpenAI writes it (Go's: `1s`, `6m0s`,
    `20ms`, `1h2m3.5s`), or a plain number of seconds; None when it is neither."""
    if text is None:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _count(text: str | None) -> int | None:
    """A count header: a whole number >= 0, else None (a server's garbage teaches nothing)."""
    if text is None or not (text.strip().isascii() and text.strip().isdigit()):
        return None
    value = int(text)
    return value if value < 2**63 else None


def _is_transient(exc: BaseException) -> bool:
    """Worth asking again: rate limits, overload, server faults, the network."""
    if isinstance(exc, openai.APIConnectionError | _TotalTimeout):  # timeouts included
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _TRANSIENT_STATUS or exc.status_code >= 500
    return False


def _retry_after(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, then `Retry-After`)."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    raw = headers.get("retry-after")
    if raw:
        try:
            return email.utils.parsedate_to_datetime(raw).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return None


async def _gather(coroutines: Iterable[Awaitable[None]]) -> None:
    """Run concurrently; the first failure cancels the others and is raised as itself. A
    lone request (a gateway's batch, most of a worker's) is awaited in place: a task costs
    two more turns of the event loop, on the path of every caller waiting for it."""
    pending = list(coroutines)
    if len(pending) == 1:
        await pending[0]
        return
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in pending:
                group.create_task(coroutine)  # type: ignore[arg-type]
    except BaseExceptionGroup as failures:
        first: BaseException = failures
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from first.__cause__
