"""Reading an embeddings response body: the vectors, in input order, or why not.

A server that ignores `encoding_format=base64` (several OpenAI-compatible servers do)
answers every vector as a JSON list of numbers. Read with `json.loads`, each number becomes
a Python float before numpy sees it: for 500 vectors of 768 dimensions that was ~130 ms of
the worker's CPU per request, most of an API-bound worker's time. simdjson parses the body
in C and hands each number list over as one float64 buffer (~14 ms for the same body).

Only bodies of the expected shape take that path. Anything else (not JSON, the NaN and
Infinity literals that Python's reader accepts, numbers out of float64's range, nested
lists) is read again by `json.loads`, so that its problem is reported exactly as before: one
message per input, decided by `ordered_items` and `decode`.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
import simdjson

Vector = np.ndarray | list[float]


def read_body(raw: bytes) -> Any:
    """The body as JSON values, each number-list `embedding` as a float64 array.

    Raises json.JSONDecodeError / UnicodeDecodeError only for a body that is not JSON."""
    try:
        return _read_fast(raw)
    except (ValueError, TypeError, KeyError, RuntimeError):  # simdjson's refusals
        return json.loads(raw)


def _read_fast(raw: bytes) -> dict[str, Any]:
    # One parser per body: a parser's documents die with its next parse.
    document = simdjson.Parser().parse(raw)
    if not isinstance(document, simdjson.Object):
        raise TypeError("not an object")
    data = document.get("data")
    if not isinstance(data, simdjson.Array):
        raise TypeError("no data list")
    usage = document.get("usage")
    return {
        "data": [_read_item(item) for item in data],
        "usage": usage.as_dict() if isinstance(usage, simdjson.Object) else usage,
    }


def _read_item(item: Any) -> dict[str, Any]:
    if not isinstance(item, simdjson.Object):
        raise TypeError("an item that is not an object")
    embedding = item.get("embedding")
    if isinstance(embedding, simdjson.Object):
        raise TypeError("an object where a vector belongs")
    if not isinstance(embedding, simdjson.Array):
        return {"index": item.get("index"), "embedding": embedding}
    values = np.frombuffer(embedding.as_buffer(of_type="d"), dtype=np.float64)
    if len(values) != len(embedding):  # as_buffer flattens nested lists
        raise TypeError("nested lists")
    return {"index": item.get("index"), "embedding": values}


def field(value: Any, name: str) -> Any:
    """A member of a JSON object, or None when there is none (or it is not an object)."""
    return value.get(name) if isinstance(value, dict) else None


def ordered_items(response: Any, expected: int) -> tuple[list[Any], str | None]:
    """The `data` items in input order (by their `index`), or why that is impossible."""
    if isinstance(response, str):
        return [], "embedding API returned a body that is not a JSON embeddings response"
    data = field(response, "data")
    if not isinstance(data, list) or not data:
        return [], "embedding API returned no embeddings (empty data)"
    if len(data) != expected:
        return [], f"embedding API returned {len(data)} embeddings for {expected} inputs"
    slots: list[Any] = [None] * expected
    for item in data:
        index = field(item, "index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < expected \
                or slots[index] is not None:
            return [], f"embedding API returned a bad or duplicate index {index!r}"
        slots[index] = item
    return slots, None


def decode(embedding: Any) -> tuple[Vector | None, str | None]:
    """A vector from base64 (little-endian float32, what we ask for) or a list of numbers.

    Number lists stay float64 here: a value beyond float4's range must be reported as such
    (vector_problem), not silently become Infinity."""
    if isinstance(embedding, str):
        try:
            raw = base64.b64decode(embedding, validate=True)
        except (binascii.Error, ValueError):
            return None, "embedding API returned an embedding that is not valid base64"
        if len(raw) % 4:
            return None, "embedding API returned a base64 embedding of a broken length"
        return np.frombuffer(raw, dtype="<f4").astype(np.float32), None
    if isinstance(embedding, np.ndarray):
        return embedding, None
    if isinstance(embedding, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in embedding):
        return [float(x) for x in embedding], None
    return None, "embedding API returned an embedding that is not a list of numbers"
