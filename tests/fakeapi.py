"""A local OpenAI-compatible embeddings server that misbehaves on request.

Tests run the real `openai` client against it, so what is exercised is the HTTP the
provider really sends (base64 encoding, headers, timeouts), not a mock's idea of it.
Standard library only; vectors are `hash_vector`, so they are deterministic.

In-process::

    with FakeAPI() as api:
        api.fail_next(2, status=429, retry_after=0.01)
        ... OpenAIProvider(spec, base_url=api.base_url, api_key="sk-test") ...
        assert api.requests == 3

As a process (benchmarks, reliability tests)::

    python -m tests.fakeapi --port 8765 --latency 0.05

then `POST /_control` with JSON such as `{"fail_next": {"n": 3, "status": 429,
"retry_after": 1}}`, `{"always_reject": "POISON"}`, `{"latency": 0.1}`,
`{"hang": {"n": 1, "seconds": 5}}`, `{"release": true}`, `{"garbage": {"kind": "nan",
"n": 1}}`, `{"reverse_data": true}`, `{"rate_limit": {"requests": 20, "window": 2,
"headers": true}}` or `{"reset": true}`; `GET /_stats` returns the counters.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.parser
import email.policy
import functools
import json
import math
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from pgembed.providers.hashing import hash_vector

GARBAGE_KINDS = ("wrong_dims", "nan", "wrong_count", "empty_data", "not_json", "huge", "zero")

#: Native sizes of the real OpenAI models; any other model uses `default_dimensions`.
NATIVE_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


def fake_token_count(text: str) -> int:
    """Deterministic and deliberately different from tiktoken: whitespace words + 1.

    Being different lets tests tell the API's `usage` apart from the client's own count.
    """
    return len(text.split()) + 1


class _Fault:
    """One queue of injected behaviour: how many more requests it applies to, and how."""

    def __init__(self) -> None:
        self.remaining = 0
        self.params: dict[str, Any] = {}

    def arm(self, n: int, **params: Any) -> None:
        self.remaining = n
        self.params = params

    def take(self) -> dict[str, Any] | None:
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        return dict(self.params)


class FakeAPI:
    """The server and its controls; every control and counter is guarded by one lock.

    Counters: `requests`, `inputs` (texts received), `tokens` (billed in 200 answers),
    `received` (every text, in arrival order), `statuses` (status -> count), `log` (per
    request: model, dimensions, encoding_format, input), `in_flight`, `max_in_flight`.
    Controls: `fail_next`, `always_reject`, `latency`, `hang`, `release` (answer the hanging
    requests now), `garbage`, `reverse_data` (answer `data` in reverse order, with correct
    `index` values), `floats_only` (answer number lists whatever `encoding_format` asks, as
    some compatible servers do), `canned` (answer pre-serialised vectors, one per position
    in the request, not per text: what a benchmark needs, a fake that costs almost no CPU),
    `rate_limit` (a true limit per fixed window, 429 past it, with OpenAI's x-ratelimit-*
    headers or without), `reset`.
    With `api_key` set, a request with another bearer token gets 401.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        default_dimensions: int = 1536,
        dimensions: dict[str, int] | None = None,
    ) -> None:
        self._address = (host, port)
        self.api_key = api_key
        self.default_dimensions = default_dimensions
        self.native_dimensions = {**NATIVE_DIMENSIONS, **(dimensions or {})}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._woken = threading.Condition(self._lock)  # hanging requests wait on it
        self._releases = 0  # release() calls so far: a hang ends when this changes
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._base_latency = latency
        self.in_flight = 0  # not reset: requests may be in flight during a reset
        self.batch_api = FakeBatches(self)  # the Batch API's files and batches (kept across resets)
        self.reset()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FakeAPI:
        handler = type("_BoundHandler", (_Handler,), {"api": self})
        server = _Server(self._address, handler)
        # Handler threads are joined on stop (they are woken first), so none outlives us.
        server.daemon_threads = False
        server.block_on_close = True
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="fakeapi",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers, cut kept-alive connections, join all."""
        if self._server is None:
            return
        self._stopping.set()
        with self._lock:
            self._woken.notify_all()
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeAPI is not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """What to give the openai client: it appends `/embeddings` itself."""
        host = self._address[0]
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}/v1"

    # ------------------------------------------------------------------ controls

    def reset(self) -> None:
        """Forget counters and every injected fault; keep the constructor's settings."""
        with self._lock:
            self.requests = 0
            self.inputs = 0
            self.tokens = 0
            self.received: list[str] = []
            self.statuses: Counter[int] = Counter()
            self.log: list[dict[str, Any]] = []
            self.max_in_flight = 0
            self._fail = _Fault()
            self._hang = _Fault()
            self._garbage = _Fault()
            self._trickle = _Fault()
            self._reject: Callable[[str], bool] | None = None
            self._reject_message = ""
            self.latency_seconds = self._base_latency
            self.reverse_data = False
            self.floats_only = False
            self.canned = False
            self._limit: _RateLimit | None = None

    def fail_next(self, n: int, status: int = 500, retry_after: float | None = None) -> None:
        """The next n requests get `status` (429 with `retry-after(-ms)` when given)."""
        with self._lock:
            self._fail.arm(n, status=status, retry_after=retry_after)

    def always_reject(
        self,
        match: str | Callable[[str], bool] | None,
        message: str | None = None,
    ) -> None:
        """Answer 400 to any batch holding a matching input, as OpenAI does for bad input.

        `match` is a substring or a predicate; None stops rejecting.
        """
        if match is None:
            predicate = None
        elif isinstance(match, str):
            needle = match

            def predicate(text: str) -> bool:
                return needle in text
        else:
            predicate = match
        with self._lock:
            self._reject = predicate
            self._reject_message = message or ("Invalid 'input': this input was rejected by the test server.")

    def latency(self, seconds: float) -> None:
        """Every request waits this long before it is answered."""
        with self._lock:
            self.latency_seconds = seconds

    def hang(self, n: int, seconds: float = 10.0) -> None:
        """The next n requests sleep `seconds` (past the client's timeout) before answering.

        release() or stopping the server wakes them, so a hang never delays the end of a test.
        """
        with self._lock:
            self._hang.arm(n, seconds=seconds)

    def release(self) -> None:
        """Answer the requests hanging now, and hang no more."""
        with self._lock:
            self._hang = _Fault()
            self._releases += 1
            self._woken.notify_all()

    def trickle(self, n: int, seconds: float = 10.0) -> None:
        """The next n answers send their body a few bytes at a time, spread over `seconds`:
        no single read waits long, the whole answer does."""
        with self._lock:
            self._trickle.arm(n, seconds=seconds)

    def take_trickle(self) -> float | None:
        with self._lock:
            params = self._trickle.take()
        return None if params is None else float(params["seconds"])

    def garbage(self, kind: str, n: int = 1) -> None:
        """The next n successful answers are malformed in the way `kind` says."""
        if kind not in GARBAGE_KINDS:
            raise ValueError(f"unknown garbage kind {kind!r}; one of {GARBAGE_KINDS}")
        with self._lock:
            self._garbage.arm(n, kind=kind)

    def rate_limit(self, requests: int | None = None, tokens: int | None = None, window: float = 60.0,
                   headers: bool = True) -> None:
        """Enforce a true limit, as OpenAI does: at most `requests` requests and `tokens`
        tokens (as billed) in each fixed window of `window` seconds; a request past either
        gets a 429 and is not counted. `headers`: every answer says what the limit is, what
        remains and when it resets (x-ratelimit-*-requests/-tokens). Both None: no limit."""
        with self._lock:
            limited = requests is not None or tokens is not None
            self._limit = _RateLimit(requests, tokens, window, headers) if limited else None

    def stats(self) -> dict[str, Any]:
        """The counters as plain JSON-able values (what `GET /_stats` returns)."""
        with self._lock:
            return {
                "requests": self.requests,
                "inputs": self.inputs,
                "tokens": self.tokens,
                "received": len(self.received),
                "max_in_flight": self.max_in_flight,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            }

    def control(self, command: dict[str, Any]) -> None:
        """Apply a `POST /_control` body: each key names a control method."""
        for name, arg in command.items():
            if name == "reset":
                if arg:
                    self.reset()
            elif name == "fail_next":
                self.fail_next(**arg)
            elif name == "always_reject":
                if isinstance(arg, dict):
                    self.always_reject(arg.get("match"), arg.get("message"))
                else:
                    self.always_reject(arg)
            elif name == "latency":
                self.latency(float(arg))
            elif name == "hang":
                if isinstance(arg, dict):
                    self.hang(**arg)
                else:
                    self.hang(int(arg))
            elif name == "release":
                if arg:
                    self.release()
            elif name == "trickle":
                self.trickle(**arg)
            elif name == "garbage":
                self.garbage(**arg)
            elif name == "rate_limit":
                self.rate_limit(**arg)
            elif name == "batches":
                self.batch_api.control(arg)
            elif name in ("reverse_data", "floats_only", "canned"):
                with self._lock:
                    setattr(self, name, bool(arg))
            else:
                raise ValueError(f"unknown control {name!r}")

    # ------------------------------------------------------------ request logic

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def _hang_for(self, seconds: float, releases: int) -> None:
        with self._lock:
            self._woken.wait_for(lambda: self._releases != releases or self._stopping.is_set(), seconds)

    def handle_embeddings(self, body: Any, auth: str | None) -> tuple[int, dict[str, str], bytes]:
        """Answer one embeddings request: (status, headers, body)."""
        texts, model, dims, fmt = _parse_request(body)
        with self._lock:
            self.requests += 1
            self.inputs += len(texts)
            self.received.extend(texts)
            self.log.append({"model": model, "dimensions": dims, "encoding_format": fmt, "input": texts})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            latency = self.latency_seconds
            hang = self._hang.take()
            releases = self._releases
            allowed, limit_headers = (True, {}) if self._limit is None else \
                self._limit.take(sum(fake_token_count(t) for t in texts))
        try:
            self._sleep(latency)
            if hang is not None:
                self._hang_for(hang["seconds"], releases)
            if allowed:
                status, headers, payload = self._answer(texts, model, dims, fmt, auth)
            else:
                status, headers, payload = _failure(429, None)
            headers = {**headers, **limit_headers}
        finally:
            with self._lock:
                self.in_flight -= 1
        with self._lock:
            self.statuses[status] += 1
        return status, headers, payload

    def _answer(
        self, texts: list[str], model: str, dims: int | None, fmt: str, auth: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            given = (auth or "").removeprefix("Bearer ")
            return _error(401, f"Incorrect API key provided: {given}.", "invalid_request_error")
        with self._lock:
            fail = self._fail.take()
            reject, reject_message = self._reject, self._reject_message
        if fail is not None:
            return _failure(fail["status"], fail["retry_after"])
        if not texts:
            return _error(400, "'input' must not be empty.", "invalid_request_error")
        if reject is not None and any(reject(t) for t in texts):
            return _error(400, reject_message, "invalid_request_error")
        if any(not t for t in texts):
            return _error(400, "'$.input' is invalid: empty string.", "invalid_request_error")
        if dims is not None and model == "text-embedding-ada-002":
            return _error(400, "This model does not support specifying dimensions.", "invalid_request_error")
        size = dims or self.native_dimensions.get(model, self.default_dimensions)
        with self._lock:
            garbage = self._garbage.take()
            reverse = self.reverse_data
            if self.floats_only:
                fmt = "float"
        kind = garbage["kind"] if garbage else None
        if self.canned and kind is None:
            return self._canned(texts, model, size, fmt)
        if kind == "not_json":
            return 200, {"Content-Type": "text/html"}, b"<html>502 Bad Gateway</html>"
        vectors = [hash_vector(t, size + 3 if kind == "wrong_dims" else size) for t in texts]
        if kind == "nan" and vectors:
            vectors[0][0] = math.nan
        if kind == "zero" and vectors:
            vectors[0] = [0.0] * size
        # 1e39 is finite in JSON and in float8 but infinite in float4 (and base64 float32
        # cannot carry it): answered as a float list whatever encoding was asked for
        if kind == "huge" and vectors:
            vectors[0][0] = 1e39
            fmt = "float"
        data = [_item(i, v, fmt) for i, v in enumerate(vectors)]
        if kind == "wrong_count":
            data = data[:-1]
        elif kind == "empty_data":
            data = []
        if reverse:
            data.reverse()
        tokens = sum(fake_token_count(t) for t in texts)
        with self._lock:
            self.tokens += tokens
        body = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


    def _canned(self, texts: list[str], model: str, size: int, fmt: str) -> tuple[int, dict[str, str], bytes]:
        tokens = sum(fake_token_count(t) for t in texts)
        with self._lock:
            self.tokens += tokens
        items = b",".join(_canned_item(i, size, fmt) for i in range(len(texts)))
        tail = json.dumps({"model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return 200, {"Content-Type": "application/json"}, b'{"object": "list", "data": [' + items + b"], " \
            + tail[1:].encode()


class _RateLimit:
    """A true limit per fixed window (what `FakeAPI.rate_limit` set), counted at arrival."""

    def __init__(self, requests: int | None, tokens: int | None, window: float, headers: bool) -> None:
        self.requests, self.tokens, self.window, self.headers = requests, tokens, window, headers
        self.started = time.monotonic()
        self.used_requests = 0
        self.used_tokens = 0

    def take(self, tokens: int) -> tuple[bool, dict[str, str]]:
        """Whether a request of `tokens` tokens is within the limit (then counted), and the
        headers its answer carries. Called under the FakeAPI's lock."""
        now = time.monotonic()
        if now - self.started >= self.window:
            self.started += (now - self.started) // self.window * self.window
            self.used_requests = self.used_tokens = 0
        allowed = (self.requests is None or self.used_requests + 1 <= self.requests) and \
            (self.tokens is None or self.used_tokens + tokens <= self.tokens)
        if allowed:
            self.used_requests += 1
            self.used_tokens += tokens
        if not self.headers:
            return allowed, {}
        reset = _go_duration(self.started + self.window - now)
        headers = {}
        for kind, limit, used in (("requests", self.requests, self.used_requests),
                                  ("tokens", self.tokens, self.used_tokens)):
            if limit is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
                headers[f"x-ratelimit-reset-{kind}"] = reset
        return allowed, headers


def _go_duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


@functools.cache
def _canned_item(index: int, size: int, fmt: str) -> bytes:
    """Dense, as real embeddings are: a float list of hash vectors would be mostly `0.0`."""
    vector = np.random.default_rng(index).standard_normal(size).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return json.dumps(_item(index, vector.tolist(), fmt)).encode()


def _parse_request(body: Any) -> tuple[list[str], str, int | None, str]:
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("'input' must be a string or a list of strings")
    model = body.get("model")
    if not isinstance(model, str):
        raise ValueError("'model' is required")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or dims < 1):
        raise ValueError("'dimensions' must be a positive integer")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ValueError("'encoding_format' must be 'float' or 'base64'")
    return texts, model, dims, fmt


def _item(index: int, vector: list[float], fmt: str) -> dict[str, Any]:
    """One `data` element; base64 is little-endian float32, as OpenAI sends it."""
    if fmt == "base64":
        packed = struct.pack(f"<{len(vector)}f", *vector)
        embedding: Any = base64.b64encode(packed).decode("ascii")
    else:
        embedding = vector
    return {"object": "embedding", "index": index, "embedding": embedding}


def _error(status: int, message: str, kind: str) -> tuple[int, dict[str, str], bytes]:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


def _failure(status: int, retry_after: float | None) -> tuple[int, dict[str, str], bytes]:
    kinds = {429: ("Rate limit reached for requests", "requests")}
    message, kind = kinds.get(status, ("The server had an error processing your request.", "server_error"))
    code, headers, body = _error(status, message, kind)
    if retry_after is not None:
        headers["retry-after-ms"] = str(round(retry_after * 1000))
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    return code, headers, body


class _Server(ThreadingHTTPServer):
    """A listen backlog for hundreds of clients connecting at once (the gateway benchmark's
    direct pass): the default of 5 resets the connections beyond it."""

    request_queue_size = 1024


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, as the openai client (httpx) expects."""

    api: FakeAPI
    protocol_version = "HTTP/1.1"
    # headers and body are two writes: with Nagle's algorithm the body waits for the
    # client's delayed ACK of the headers, some 40 ms a request on Linux
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.api._track(self.connection, add=True)

    def finish(self) -> None:
        self.api._track(self.connection, add=False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: test output is for test failures."""

    def do_GET(self) -> None:
        batch_answer = self._batch_api("GET", b"")
        if batch_answer is not None:
            self._send(*batch_answer)
        elif self.path.rstrip("/") == "/_stats":
            self._send(200, {"Content-Type": "application/json"}, json.dumps(self.api.stats()).encode())
        else:
            self._send(*_error(404, f"no route {self.path}", "not_found"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        batch_answer = self._batch_api("POST", raw)
        if batch_answer is not None:
            self._send(*batch_answer)
            return
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._send(*_error(400, "body is not valid JSON", "invalid_request_error"))
            return
        try:
            if path in ("/v1/embeddings", "/embeddings"):
                answer = self.api.handle_embeddings(body, self.headers.get("Authorization"))
                slowly = self.api.take_trickle()
                if slowly is not None:
                    self._send(*answer, spread=slowly)
                    return
            elif path == "/_control":
                self.api.control(body)
                answer = (200, {"Content-Type": "application/json"}, b'{"ok": true}')
            else:
                answer = _error(404, f"no route {path}", "not_found")
        except (ValueError, TypeError) as exc:
            answer = _error(400, str(exc), "invalid_request_error")
        self._send(*answer)

    def _batch_api(self, method: str, raw: bytes) -> tuple[int, dict[str, str], bytes] | None:
        """The Batch API's routes (FakeBatches), one at a time."""
        with self.api.batch_api.lock:
            try:
                return self.api.batch_api.route(method, self.path.split("?", 1)[0], self.headers, raw)
            except (ValueError, KeyError, TypeError) as exc:
                return _error(400, f"bad batch request: {exc}", "invalid_request_error")

    def _send(self, status: int, headers: dict[str, str], body: bytes, spread: float = 0.0) -> None:
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if spread <= 0:
                self.wfile.write(body)
                return
            pieces = max(1, min(len(body), int(spread / 0.05)))
            size = -(-len(body) // pieces)
            for start in range(0, len(body), size):
                self.wfile.write(body[start:start + size])
                self.wfile.flush()
                if self.api._stopping.wait(spread / pieces):
                    return
        except OSError:
            # The client gave up (timeout) and closed the connection: nothing to tell it.
            self.close_connection = True


# ------------------------------------------------------------------- Batch API
# The provider's Batch API (tests/test_batch_api*.py): files and batches with the real
# API's shapes, so that the real openai client uploads, creates, polls and downloads.


class FakeBatches:
    """Files (`POST /v1/files`, multipart; `GET /v1/files/{id}/content`) and batches
    (`POST /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`).

    A created batch is `in_progress` until `complete()` runs its lines (through the fake's
    own embeddings, so vectors, usage and the counters are the same as for a direct request)
    or `auto_complete` is set, when it completes as it is created. `fail_lines(match)` makes
    the lines with an input containing `match` answer 400 (in the error file, as the API
    does); `expire(done=n)` runs the first n lines and expires the rest (`batch_expired`).
    Counters: `lines_run`, `inputs_run` (what the batches sent through the embeddings).
    Over `/_control`: `{"batches": {"complete": true}}`, `{"batches": {"expire": 3}}`,
    `{"batches": {"auto_complete": true}}`, `{"batches": {"fail_lines": "POISON"}}`.
    """

    def __init__(self, api: FakeAPI) -> None:
        self.api = api
        # its own lock: a batch's lines run through the embeddings, which take the API's
        self.lock = threading.RLock()
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.auto_complete = False
        self.failing: str | None = None
        self.lines_run = 0
        self.inputs_run = 0
        self._ids = 0

    # ------------------------------------------------------------ controls

    def complete(self, batch_id: str | None = None) -> None:
        """Runs every line of the open batches (or of one) and completes them."""
        with self.lock:
            for batch in self._open(batch_id):
                self._run(batch, None)

    def expire(self, done: int = 0, batch_id: str | None = None) -> None:
        with self.lock:
            for batch in self._open(batch_id):
                self._run(batch, done)

    def fail_lines(self, match: str | None) -> None:
        with self.lock:
            self.failing = match

    def control(self, command: dict[str, Any]) -> None:
        for name, arg in command.items():
            if name == "complete":
                self.complete()
            elif name == "expire":
                self.expire(int(arg))
            elif name == "auto_complete":
                self.auto_complete = bool(arg)
            elif name == "fail_lines":
                self.fail_lines(arg)
            else:
                raise ValueError(f"unknown batches control {name!r}")

    # -------------------------------------------------------------- routes

    def route(self, method: str, path: str, headers: Any, raw: bytes) -> tuple[int, dict[str, str], bytes] | None:
        """The answer to a files or batches request; None for any other path."""
        parts = path.strip("/").split("/")
        if parts[:1] == ["v1"]:
            parts = parts[1:]
        if not parts or parts[0] not in ("files", "batches"):
            return None
        if self.api.api_key is not None and headers.get("Authorization") != f"Bearer {self.api.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error")
        if method == "POST" and parts == ["files"]:
            return self._upload(headers.get("Content-Type", ""), raw)
        if method == "GET" and len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            if parts[1] not in self.contents:
                return _error(404, f"No such File object: {parts[1]}", "invalid_request_error")
            return 200, {"Content-Type": "application/octet-stream"}, self.contents[parts[1]]
        if method == "POST" and parts == ["batches"]:
            return self._create(json.loads(raw or b"{}"))
        if len(parts) >= 2 and parts[0] == "batches":
            batch = self.batches.get(parts[1])
            if batch is None:
                return _error(404, f"No batch found with id '{parts[1]}'.", "invalid_request_error")
            if method == "POST" and parts[2:] == ["cancel"]:
                if batch["status"] in ("validating", "in_progress", "finalizing"):
                    self._finish(batch, "cancelled", [], [])
            elif not (method == "GET" and len(parts) == 2):
                return _error(404, f"no route {path}", "not_found")
            return 200, {"Content-Type": "application/json"}, json.dumps(batch).encode()
        return _error(404, f"no route {path}", "not_found")

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-fake{self._ids:06d}"

    def _store_file(self, name: str, purpose: str, content: bytes) -> dict[str, Any]:
        file = {"id": self._new_id("file"), "object": "file", "bytes": len(content),
                "created_at": int(time.time()), "filename": name, "purpose": purpose,
                "status": "processed"}
        self.files[file["id"]] = file
        self.contents[file["id"]] = content
        return file

    def _upload(self, content_type: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        if not message.is_multipart():
            return _error(400, "expected a multipart/form-data upload", "invalid_request_error")
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            fields[str(name)] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
        if "file" not in fields or "purpose" not in fields:
            return _error(400, "'file' and 'purpose' are required", "invalid_request_error")
        file = self._store_file(fields["file"][0] or "upload", fields["purpose"][1].decode(), fields["file"][1])
        return 200, {"Content-Type": "application/json"}, json.dumps(file).encode()

    def _create(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        file_id = body.get("input_file_id")
        if file_id not in self.files or self.files[file_id]["purpose"] != "batch":
            return _error(400, f"Invalid 'input_file_id': {file_id!r}.", "invalid_request_error")
        if body.get("endpoint") != "/v1/embeddings" or body.get("completion_window") != "24h":
            return _error(400, "this fake runs /v1/embeddings batches in a 24h window", "invalid_request_error")
        now = int(time.time())
        batch: dict[str, Any] = {
            "id": self._new_id("batch"), "object": "batch", "endpoint": "/v1/embeddings",
            "errors": None, "input_file_id": file_id, "completion_window": "24h",
            "status": "in_progress", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": now, "expires_at": now + 86400,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        lines = [json.loads(line) for line in self.contents[file_id].splitlines() if line.strip()]
        batch["request_counts"]["total"] = len(lines)
        inputs = sum(len(line["body"]["input"]) for line in lines)
        problem = ("too many requests" if len(lines) > 50_000 else
                   "too many embedding inputs" if inputs > 50_000 else
                   "duplicate custom_id" if len({line["custom_id"] for line in lines}) < len(lines) else None)
        self.batches[batch["id"]] = batch
        if problem is not None:
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [
                {"code": "invalid_file", "message": f"The batch input file is invalid: {problem}.",
                 "param": None, "line": None}]})
        elif self.auto_complete:
            self._run(batch, None)
        return 200, {"Content-Type": "application/json"}, json.dumps(batch).encode()

    def _open(self, batch_id: str | None) -> list[dict[str, Any]]:
        return [b for b in self.batches.values()
                if b["status"] == "in_progress" and batch_id in (None, b["id"])]

    def _run(self, batch: dict[str, Any], done: int | None) -> None:
        """Each line through the fake's embeddings; `done` lines only, the rest expired."""
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        content = self.contents[batch["input_file_id"]]
        for n, line in enumerate(json.loads(x) for x in content.splitlines() if x.strip()):
            request_id = self._new_id("batch_req")
            if done is not None and n >= done:
                errors.append({"id": request_id, "custom_id": line["custom_id"], "response": None,
                               "error": {"code": "batch_expired", "message": "This request could not be "
                                         "executed before the completion window expired."}})
                continue
            texts = line["body"]["input"]
            if self.failing is not None and any(self.failing in t for t in texts):
                status, _, payload = _error(400, "Invalid 'input': rejected by the test server.",
                                            "invalid_request_error")
            else:
                status, _, payload = self.api.handle_embeddings(line["body"], f"Bearer {self.api.api_key}")
                self.lines_run += 1
                self.inputs_run += len(texts)
            answer = {"id": request_id, "custom_id": line["custom_id"], "error": None,
                      "response": {"status_code": status, "request_id": request_id, "body": json.loads(payload)}}
            (output if status == 200 else errors).append(answer)
        self._finish(batch, "completed" if done is None else "expired", output, errors)

    def _finish(self, batch: dict[str, Any], status: str, output: list[dict[str, Any]],
                errors: list[dict[str, Any]]) -> None:
        now = int(time.time())
        batch["status"] = status
        batch[{"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]] = now
        for key, lines in (("output_file_id", output), ("error_file_id", errors)):
            if lines:
                text = "".join(json.dumps(line) + "\n" for line in lines).encode()
                batch[key] = self._store_file(f"{batch['id']}_{key}.jsonl", "batch_output", text)["id"]
        batch["request_counts"].update(completed=len(output), failed=len(errors))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible fake embeddings API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--api-key", default=None, help="require this bearer token")
    parser.add_argument(
        "--dimensions",
        type=int,
        default=1536,
        help="vector size for models not named after a real OpenAI model",
    )
    args = parser.parse_args(argv)
    api = FakeAPI(
        args.host,
        args.port,
        latency=args.latency,
        api_key=args.api_key,
        default_dimensions=args.dimensions,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with api:
        print(f"fakeapi listening on {api.base_url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not done.wait(0.1):  # a timed wait lets the signal handler run promptly
                pass


if __name__ == "__main__":
    main()
