"""The fast reader of embeddings bodies gives exactly what json.loads would, or defers to it.

Every body the fast path takes must yield the same numbers, bit for bit, as the slow path;
every body it cannot take must come out as json.loads reads it, so that the provider's
messages for malformed answers do not depend on which reader ran."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest

from pgembed.providers.base import vector_problem
from pgembed.providers.response import decode, ordered_items, read_body


def body(*embeddings: Any, usage: Any = None) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)]
    return json.dumps({"object": "list", "data": data, "usage": usage or {"prompt_tokens": 7}}).encode()


def vectors(raw: bytes, count: int) -> list[tuple[Any, str | None]]:
    items, problem = ordered_items(read_body(raw), count)
    assert problem is None, problem
    return [decode(item["embedding"]) for item in items]


def test_number_lists_arrive_as_arrays_equal_to_the_slow_path_bit_for_bit() -> None:
    rng = random.Random(7)
    lists = [[rng.uniform(-1, 1) for _ in range(768)] for _ in range(20)]
    lists.append([rng.choice([0, 1, -3]) for _ in range(768)])  # integers are numbers too
    lists.append([1e-320, 3.4e38, -5e-324, 0.1] * 192)  # subnormals, float4's edge
    raw = body(*lists)
    fast = read_body(raw)
    assert fast["usage"] == {"prompt_tokens": 7}
    for item, expected in zip(fast["data"], lists, strict=True):
        assert isinstance(item["embedding"], np.ndarray)  # no Python float per value
        assert item["embedding"].tobytes() == np.asarray(expected, dtype=np.float64).tobytes()


def test_base64_strings_pass_through_untouched() -> None:
    packed = "AACAPwAAAEA="  # [1.0, 2.0] as little-endian float32
    [(vector, problem)] = vectors(body(packed), 1)
    assert problem is None and vector is not None and list(vector) == [1.0, 2.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[NaN, 1.0]', "NaN or Infinity"),  # a literal Python's reader accepts
        ('[1e400, 1.0]', "NaN or Infinity"),  # beyond float64: json.loads makes it inf
        ('[1e39, 1.0]', "out of range for a float4 vector"),
        ('[[1.0, 2.0]]', "not a list of numbers"),  # nested: never flattened into a vector
        ('[1.0, "2"]', "not a list of numbers"),
        ('[true, 1.0]', "not a list of numbers"),
        ('[null, 1.0]', "not a list of numbers"),
        ('{"x": 1.0}', "not a list of numbers"),
        ('[0.0, 0.0]', "all-zero"),
    ],
)
def test_odd_vectors_get_the_same_message_whichever_reader_ran(text: str, expected: str) -> None:
    raw = (b'{"data": [{"index": 0, "embedding": %s}], "usage": {"prompt_tokens": 1}}' % text.encode())
    for parsed in (read_body(raw), json.loads(raw)):
        items, problem = ordered_items(parsed, 1)
        assert problem is None
        vector, problem = decode(items[0]["embedding"])
        if problem is None:
            assert vector is not None
            problem = vector_problem(vector, 2 if text != '[[1.0, 2.0]]' else 1)
        assert problem is not None and expected in problem, (parsed, problem)


@pytest.mark.parametrize(
    "raw",
    [b'{"data": [{"index": true, "embedding": [1.0]}]}', b'{"data": [{"index": 0.0, "embedding": [1.0]}]}',
     b'{"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}]}'],
    ids=["bool", "float", "duplicate"],
)
def test_bad_indexes_are_refused(raw: bytes) -> None:
    count = json.loads(raw)["data"].__len__()
    _, problem = ordered_items(read_body(raw), count)
    assert problem is not None and "bad or duplicate index" in problem


def test_a_body_that_is_not_json_raises_as_json_loads_does() -> None:
    with pytest.raises(json.JSONDecodeError):
        read_body(b"<html>502 Bad Gateway</html>")


def test_a_body_without_data_reads_as_json_does() -> None:
    raw = b'{"error": {"message": "nope"}}'
    assert read_body(raw) == json.loads(raw)
