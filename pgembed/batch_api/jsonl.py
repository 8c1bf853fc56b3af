"""The Batch API's files: the request lines pgembed writes and the answers it reads back.

A line is one `/v1/embeddings` request of the batch, as the worker would have sent it
(`encoding_format` base64, `dimensions` when the pipeline shortens the model's vectors),
within the model's per-request limits; a batch holds at most 50,000 lines, 50,000 inputs
and 200 MB (the API's limits). The answers are read with the provider's own response
reader and checked with the worker's vector checks, so a batch vector that could not be
stored by the worker is not stored from a batch either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pgembed.providers import ModelSpec
from pgembed.providers.base import sound_vectors
from pgembed.providers.response import decode, ordered_items
from pgembed.providers.response import field as body_field

MAX_LINES = 50_000
MAX_INPUTS = 50_000  # embedding inputs across all the lines of one batch
MAX_BYTES = 190 * 1024 * 1024  # the API takes 200 MB; JSON escaping makes room for error


@dataclass
class Line:
    """One request: custom_id `line-<number>`, its inputs (texts, and their cache keys in
    the same order), and who pays for it."""

    number: int
    purpose: str
    cost_center: str | None
    hashes: list[bytes] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    tokens: int = 0

    @property
    def custom_id(self) -> str:
        return f"line-{self.number}"


@dataclass
class Output:
    """What came back: vectors by cache key (with the tokens each is credited), the tokens
    billed per (purpose, cost center) line group, and the lines that failed or expired."""

    vectors: dict[bytes, tuple[np.ndarray, int]] = field(default_factory=dict)
    billed: dict[int, int] = field(default_factory=dict)  # line -> tokens
    failed: dict[int, str] = field(default_factory=dict)  # line -> why


def pack(wanted: list[tuple[bytes, str, str, str | None]], spec: ModelSpec,
         count: Callable[[str], int]) -> list[Line]:
    """Lines for `wanted` ((hash, text, purpose, cost center), in order), one purpose and
    cost center a line so that each line's bill has one payer, each within the model's
    inputs and tokens per request."""
    lines: list[Line] = []
    open_lines: dict[tuple[str, str | None], Line] = {}
    for h, text, purpose, cost_center in wanted:
        tokens = count(text)
        line = open_lines.get((purpose, cost_center))
        if line is None or len(line.hashes) >= spec.max_batch_inputs or (
                line.tokens + tokens > spec.max_batch_tokens and line.hashes):
            line = Line(len(lines) + 1, purpose, cost_center)
            lines.append(line)
            open_lines[(purpose, cost_center)] = line
        line.hashes.append(h)
        line.texts.append(text)
        line.tokens += tokens
    return lines


def request(line: Line, spec: ModelSpec) -> bytes:
    body: dict[str, object] = {"model": spec.name, "input": line.texts, "encoding_format": "base64"}
    if spec.dimensions != spec.native_dimensions:
        body["dimensions"] = spec.dimensions
    return json.dumps({"custom_id": line.custom_id, "method": "POST", "url": "/v1/embeddings",
                       "body": body}, ensure_ascii=False).encode() + b"\n"


def line_number(custom_id: object) -> int | None:
    if not isinstance(custom_id, str) or not custom_id.startswith("line-"):
        return None
    digits = custom_id.removeprefix("line-")
    return int(digits) if digits.isdigit() else None


def read_output(content: bytes, lines: dict[int, list[bytes]], dimensions: int, into: Output) -> None:
    """Adds the answers of one output or error file to `into`. A line is good when its
    response is a 200 with a vector for each of its inputs, every one storable; anything
    else (an error, a bad answer, an unknown custom_id) is that line's failure."""
    for raw in content.splitlines():
        if not raw.strip():
            continue
        try:
            answer = json.loads(raw)
        except ValueError:
            continue  # a line that is not JSON names no request: its rows are requeued anyway
        number = line_number(body_field(answer, "custom_id"))
        if number is None or number not in lines:
            continue
        problem = _line_problem(answer, len(lines[number]), dimensions, into, lines[number], number)
        if problem is not None:
            into.failed[number] = problem


def _line_problem(answer: object, expected: int, dimensions: int, into: Output, hashes: list[bytes],
                  number: int) -> str | None:
    response = body_field(answer, "response")
    error = body_field(answer, "error")
    status = body_field(response, "status_code")
    if status != 200:
        message = body_field(error, "message") or body_field(body_field(body_field(response, "body"), "error"),
                                                            "message")
        return f"HTTP {status}: {message}" if status else str(message or "no response")
    body = body_field(response, "body")
    items, problem = ordered_items(body, expected)
    if problem is not None:
        return problem
    vectors = []
    for item in items:
        vector, problem = decode(body_field(item, "embedding"))
        if problem is not None:
            return problem
        vectors.append(vector)
    matrix, problems = sound_vectors(vectors, dimensions)
    bad = next((p for p in problems if p is not None), None)
    if bad is not None:
        return bad
    usage = body_field(body_field(body, "usage"), "total_tokens")
    tokens = usage if isinstance(usage, int) and usage >= 0 else 0
    into.billed[number] = tokens
    share, extra = divmod(tokens, expected)
    for i, h in enumerate(hashes):
        into.vectors[h] = (matrix[i], share + (1 if i < extra else 0))
    return None
