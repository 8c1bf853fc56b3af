"""The gateway's requests and answers in OpenAI's shapes.

An OpenAI SDK pointed at the gateway must not tell the difference: the same request fields
(unknown ones ignored, as OpenAI ignores them), the same answer, and errors as
`{"error": {"message", "type", "param", "code"}}` with OpenAI's statuses, so that the SDK
raises the exception it would raise for OpenAI (BadRequestError, AuthenticationError...).

Vectors are float32 from end to end (the provider is asked for base64, the cache is
pgvector's float4): base64 is those bytes unchanged; a float is printed as the float64 value
of that float32, exactly what OpenAI prints, so that an SDK parses back the same float32.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request

from pgembed.gateway.settings import MAX_INPUTS

MAX_K = 1000  # rows one search may ask for


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


async def read_json(request: Request, cap: int) -> dict[str, Any]:
    """The body as a JSON object; 413 as soon as it is known to exceed `cap` bytes (by its
    Content-Length before anything is read, or while it streams in), never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ApiError(413, f"request body of {int(declared)} bytes is over the gateway's limit of {cap}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise ApiError(413, f"request body is over the gateway's limit of {cap} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return document


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    texts: list[str]
    dimensions: int | None
    encoding_format: str
    user: object


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def embeddings_request(body: dict[str, Any]) -> EmbeddingsRequest:
    """POST /v1/embeddings' body, checked as OpenAI checks it (400 naming the field)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise ApiError(400, "'input' must be a non-empty string or list of strings", param="input")
    if any(_integer(t) or isinstance(t, list) for t in texts):
        raise ApiError(400, "token-array inputs are not supported by the pgembed gateway: send the text",
                       param="input")
    if not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "'input' must be a string or a list of strings", param="input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(400, f"'input' has {len(texts)} items, more than the maximum of {MAX_INPUTS}",
                       param="input")
    if any(not t for t in texts):
        raise ApiError(400, "'input' is invalid: empty string", param="input")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _integer(dimensions) or dimensions < 1):
        raise ApiError(400, "'dimensions' must be a positive integer", param="dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return EmbeddingsRequest(model, texts, dimensions, fmt, body.get("user"))


def embeddings_answer(model: str, vectors: Sequence[np.ndarray], fmt: str, tokens: int) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, fmt)} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encoded(vector: np.ndarray, fmt: str) -> str | list[float]:
    floats = np.asarray(vector, dtype="<f4")
    if fmt == "base64":
        return base64.b64encode(floats.tobytes()).decode("ascii")
    return floats.tolist()  # float32 -> the float64 of the same value: what OpenAI prints


@dataclass(frozen=True)
class SearchRequest:
    target: str
    text: str | None
    vector: list[float] | None
    k: int
    filter: dict[str, Any] | None
    user: object


def search_request(body: dict[str, Any]) -> SearchRequest:
    """POST /v1/search's body: a target, a query text or a vector, k, a filter."""
    target = body.get("target")
    if not isinstance(target, str) or not target:
        raise ApiError(400, "'target' must name an alias or a pipeline", param="target")
    text, vector = body.get("query"), body.get("vector")
    if (text is None) == (vector is None):
        raise ApiError(400, "give a 'query' text or a 'vector', exactly one of them", param="query")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise ApiError(400, "'query' must be a non-empty string", param="query")
    if vector is not None and (not isinstance(vector, list) or not vector
                               or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vector)):
        raise ApiError(400, "'vector' must be a non-empty list of numbers", param="vector")
    k = body.get("k", 5)
    if not _integer(k) or not 1 <= k <= MAX_K:
        raise ApiError(400, f"'k' must be an integer from 1 to {MAX_K}", param="k")
    filter = body.get("filter")
    if filter is not None and not isinstance(filter, dict):
        raise ApiError(400, "'filter' must be an object of source columns and values", param="filter")
    return SearchRequest(target, text, vector, k, filter, body.get("user"))


#: the longest a /v1/sync call may wait: past it, a worker converges what is left
MAX_SYNC_SECONDS = 60.0


@dataclass(frozen=True)
class SyncRequest:
    target: str
    keys: list[Any]
    timeout: float


def sync_request(body: dict[str, Any]) -> SyncRequest:
    """POST /v1/sync's body: a target, its keys (checked against the source's key by
    pgembed.writethrough), and how long to wait."""
    target = body.get("target")
    if not isinstance(target, str) or not target:
        raise ApiError(400, "'target' must name an alias or a pipeline", param="target")
    keys = body.get("keys")
    if not isinstance(keys, list) or not keys:
        raise ApiError(400, "'keys' must be a non-empty list of the rows' primary keys", param="keys")
    timeout = body.get("timeout", 10)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= MAX_SYNC_SECONDS:
        raise ApiError(400, f"'timeout' must be a number of seconds, more than 0 and at most {MAX_SYNC_SECONDS:g}",
                       param="timeout")
    return SyncRequest(target, keys, float(timeout))
