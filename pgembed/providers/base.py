"""The one small contract between the worker and every embedding provider.

Providers know nothing of the database: texts go in, vectors (or a per-input error) and
token counts come out. Limits arrive in a `ModelSpec`, which the caller reads from
`pgembed.models`, so a provider never has to guess what its API accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


class ProviderError(Exception):
    """The whole call failed (after retries): nothing in it can be trusted, retry later."""


class UnknownModelError(ValueError):
    """The model name does not name a provider pgembed knows."""


@dataclass(frozen=True)
class ModelSpec:
    """What the caller knows of a model: its name and the limits of its API.

    `model` is the full `provider:name` string; `dimensions` is the size the vectors must
    have in the end (a Matryoshka model is asked for it; a local one is truncated to it).
    """

    model: str
    dimensions: int
    native_dimensions: int
    max_input_tokens: int = 8191
    max_batch_inputs: int = 2048
    max_batch_tokens: int = 300_000

    @property
    def provider(self) -> str:
        return self.model.split(":", 1)[0]

    @property
    def name(self) -> str:
        return self.model.split(":", 1)[1]


@dataclass
class EmbedResult:
    """One vector or one error message per input, in input order, plus what it cost."""

    vectors: Sequence[list[float] | np.ndarray | None]
    errors: list[str | None]
    tokens: int = 0
    requests: int = 0
    inputs_sent: int = 0
    token_counts: list[int] = field(default_factory=list)


class Provider(Protocol):
    spec: ModelSpec

    async def embed(self, texts: list[str]) -> EmbedResult:
        """Embed every text; a bad input gets an error, never an exception for the batch."""
        ...

    async def aclose(self) -> None: ...

    # A provider may also have `async def check(self) -> None`, which raises ProviderError
    # when it cannot work at all (a model that cannot be loaded); a worker calls it before
    # it claims anything for the provider's pipelines. Making the provider checks the rest.


@runtime_checkable
class LateChunker(Protocol):
    """A provider that can embed chunks in their document's context (local models only:
    pgembed.providers.late): one vector a span, documents after one another."""

    async def embed_late(self, documents: list[tuple[str, list[tuple[int, int]]]]) -> EmbedResult: ...


def late_chunker(provider: object) -> LateChunker:
    """The provider as a LateChunker; create_pipeline lets only local models late-chunk, so
    another is a configuration error: the batch goes back."""
    if not isinstance(provider, LateChunker):
        raise ProviderError(f"{type(provider).__name__} cannot late-chunk: only local: models can")
    return provider


class RateLimiter(Protocol):
    """A budget shared by everyone who uses one API key; a provider asks it before each HTTP
    request it sends, retries included.

    `acquire` returns once `requests` requests carrying `tokens` tokens may be sent now,
    sleeping as long as the budget needs; the grant is already counted when it returns. It
    raises ProviderError when the budget cannot be consulted. Providers hold one only as
    this protocol; `pgembed.ratelimit.BucketLimiter` keeps the budget in PostgreSQL.
    """

    async def acquire(self, requests: int, tokens: int) -> None: ...


# pgvector stores float4: a larger magnitude (finite in float8, e.g. 1e39) becomes infinite
FLOAT4_MAX = float(np.finfo(np.float32).max)


def vector_problem(vector: list[float] | np.ndarray, dimensions: int) -> str | None:
    """Why a vector from a provider must not be stored, or None when it is sound. (numpy:
    a Python loop over every float was a tenth of an API-bound worker's time.)"""
    if len(vector) != dimensions:
        return f"provider returned {len(vector)} dimensions, expected {dimensions}"
    values = np.asarray(vector, dtype=np.float64)
    if not np.isfinite(values).all():
        return "provider returned a vector containing NaN or Infinity"
    if values.size and float(np.abs(values).max()) > FLOAT4_MAX:
        return (f"provider returned a value out of range for a float4 vector "
                f"({float(np.abs(values).max()):g}; at most {FLOAT4_MAX:g})")
    if not values.any():
        return "provider returned an all-zero vector (it has no direction: cosine distance is undefined)"
    return None


def sound_vectors(vectors: Sequence[list[float] | np.ndarray | None],
                  dimensions: int) -> tuple[np.ndarray, list[str | None]]:
    """The vectors of one answer as one float32 matrix (a row per vector; zeros where there
    is none or it is unsound) and why each must not be stored (None: sound). One pass of
    numpy over the whole batch instead of three over each vector; vector_problem words the
    message of the rare bad one."""
    matrix = np.zeros((len(vectors), dimensions), dtype=np.float32)
    problems: list[str | None] = [None] * len(vectors)
    shaped = [i for i, v in enumerate(vectors) if v is not None and len(v) == dimensions]
    if shaped:
        values = np.asarray([vectors[i] for i in shaped], dtype=np.float64).reshape(len(shaped), dimensions)
        with np.errstate(invalid="ignore", over="ignore"):
            # NaN fails both comparisons, infinities one of them
            sound = (values.max(axis=1) <= FLOAT4_MAX) & (values.min(axis=1) >= -FLOAT4_MAX) & values.any(axis=1)
            matrix[shaped] = values
    else:
        sound = np.zeros(0, dtype=bool)
    ok = {i for i, good in zip(shaped, sound, strict=True) if good}
    for i, vector in enumerate(vectors):
        if vector is not None and i not in ok:
            problems[i] = vector_problem(vector, dimensions)
    return matrix, problems
