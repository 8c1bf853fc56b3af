"""Nearest-neighbour search over a pipeline's destination table.

The query text is embedded like any chunk: through the cache, and recorded in
pgembed.usage with purpose `query` and the caller's cost center. A query that reaches an
API spends the same per-key budget as the workers (pgembed.rate_limits): when the key has
one, the request waits for its grant, asked on a connection of its own so that the caller's
transaction never holds the budget's row lock. A key without a budget costs one read.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg.adapt import PyFormat
from psycopg.types.json import Jsonb

from pgembed import aliases, pipelines, ratelimit
from pgembed.attribution import Attribution
from pgembed.cache import chunk_key
from pgembed.providers import ModelSpec, ProviderError, make_provider
from pgembed.sqlfiles import query


@dataclass(frozen=True)
class Hit:
    key: dict[str, Any]
    chunk: str
    distance: float
    chunk_seq: int = 0  # which chunk of the row matched best


def model_spec(conn: psycopg.Connection, model: str, dimensions: int) -> ModelSpec:
    row = conn.execute(query("model_info"), {"model": model}).fetchone()
    assert row is not None
    return ModelSpec(model, dimensions, row[0], row[1], row[2], row[3])


def _budget(conn: psycopg.Connection, spec: ModelSpec) -> ratelimit.RateLimits | None:
    """Where the query's request must be granted; None when its API key has no budget (or
    the model calls no API), so that an unlimited key opens no connection."""
    if spec.provider != "openai":
        return None
    return ratelimit.RateLimits.beside(conn) if ratelimit.is_limited(conn, ratelimit.openai_bucket()) else None


async def _embed_one(spec: ModelSpec, text: str,
                     limits: ratelimit.RateLimits | None = None) -> tuple[list[float], int, int]:
    async with contextlib.AsyncExitStack() as stack:
        limiter = None
        if limits is not None:
            stack.push_async_callback(limits.aclose)
            limiter = limits.for_spec(spec)
        provider = make_provider(spec, limiter=limiter)
        stack.push_async_callback(provider.aclose)
        result = await provider.embed([text])
    vector, error = result.vectors[0], result.errors[0]
    if vector is None:
        raise ProviderError(f"cannot embed the query: {error}")
    return list(map(float, vector)), result.tokens, result.requests


def query_vector(conn: psycopg.Connection, spec: ModelSpec, text: str, pipeline: str | None,
                 cost_center: str | None = None, attribution: Attribution | None = None) -> np.ndarray:
    """The query's vector, from the cache or the provider, its usage recorded under the
    caller's labels (`cost_center`, when given, wins over the attribution's)."""
    labels = (attribution or Attribution()).usage_params()
    if cost_center is not None:
        labels["cost_center"] = cost_center
    h = chunk_key(spec.model, spec.dimensions, text)
    row = conn.execute(query("query_cache_get"), {"hash": h}).fetchone()
    hit = row is not None
    if row is not None:
        vector, tokens, requests = row[0].to_numpy(), 0, 0
    else:
        raw, tokens, requests = asyncio.run(_embed_one(spec, text, _budget(conn, spec)))
        vector = np.asarray(raw, dtype=np.float32)
        conn.execute(query("query_cache_put"), {
            "hash": h, "model": spec.model, "dimensions": spec.dimensions,
            "embedding": vector, "tokens": tokens})
    conn.execute(query("query_usage"), {
        "pipeline": pipeline, "model": spec.model, **labels,
        "requests": requests, "inputs": 0 if hit else 1, "tokens": tokens,
        "cache_hits": int(hit), "cache_misses": int(not hit)})
    return vector


def _sendable(conn: psycopg.Connection | psycopg.AsyncConnection, array: np.ndarray) -> np.ndarray | list[float]:
    """The query vector as pgvector's type (from the array's buffer; the server casts it to
    real[]) on a connection that has it registered, as pgembed's have: a list of floats is
    printed and parsed as text, which costs about as much as the index scan itself."""
    try:
        conn.adapters.get_dumper(np.ndarray, PyFormat.AUTO)
    except psycopg.ProgrammingError:
        return array.tolist()
    return array


Filter = dict[str, Any]  # source column -> value, or -> list of values (IN)


class FilterError(pipelines.PipelineError):
    """A filter naming a column the source does not have, or a value that is no value:
    the caller's input, which the command line answers with a usage error."""


def search(conn: psycopg.Connection, pipeline: str, text: str | None = None, k: int = 5,
           cost_center: str | None = None, *, vector: np.ndarray | list[float] | None = None,
           filter: Filter | None = None, attribution: Attribution | None = None) -> list[Hit]:
    """The k rows nearest to a text (embedded with the pipeline's model, through the cache)
    or to a vector given as is: one hit per row, its best chunk (pgembed.search in SQL),
    among the rows whose source columns equal `filter`'s values. `pipeline` may be an
    alias: it searches the pipeline the alias points at."""
    return search_with_vector(conn, pipeline, text, k, cost_center, vector=vector, filter=filter,
                              attribution=attribution)[0]


def search_with_vector(conn: psycopg.Connection, pipeline: str, text: str | None = None, k: int = 5,
                       cost_center: str | None = None, *, vector: np.ndarray | list[float] | None = None,
                       filter: Filter | None = None,
                       attribution: Attribution | None = None) -> tuple[list[Hit], np.ndarray]:
    """`search`, and the query's vector too: a caller that searches again, or reranks, need
    not embed the text twice. A vector given goes to pgembed.search alone, one round trip:
    the function checks the pipeline and the dimensions itself."""
    check_arguments(text, vector, k, filter)
    if vector is None:
        assert text is not None
        # resolved once: the query is embedded for, and searched in, the same pipeline even if
        # the alias is repointed meanwhile (a vector's search resolves the alias in SQL)
        p = aliases.pipeline_of(conn, pipeline)
        pipeline = p["name"]
        vector = query_vector(conn, model_spec(conn, p["model"], p["dimensions"]), text, pipeline, cost_center,
                              attribution)
    array = np.asarray(vector, dtype=np.float32)
    try:
        rows = conn.execute(query("search"), search_params(conn, pipeline, array, k, filter)).fetchall()
    except psycopg.Error as error:
        raise refusal(error) from error
    return hits(rows), array


def check_arguments(text: str | None, vector: object, k: int, filter: object) -> None:
    """The caller's mistakes a search can see before it asks the database."""
    if k < 1:
        raise ValueError("k must be at least 1")
    if (text is None) == (vector is None):
        raise ValueError("search takes a text or a vector, exactly one of them")
    if filter is not None and not isinstance(filter, dict):
        raise ValueError("a search filter is a dict of source columns and values")


def search_params(conn: psycopg.Connection | psycopg.AsyncConnection, pipeline: str, array: np.ndarray,
                  k: int, filter: Filter | None) -> dict[str, Any]:
    """The `search` query's parameters (the in-process async client's as well)."""
    return {"pipeline": pipeline, "vector": _sendable(conn, array), "k": k,
            "filter": None if filter is None else Jsonb(filter)}


def refusal(error: psycopg.Error) -> pipelines.PipelineError:
    """pgembed.search's refusal as the caller's error: a FilterError for a filter the
    source cannot answer, else the PipelineError of an unknown target or a wrong size."""
    if isinstance(error, psycopg.errors.UndefinedColumn | psycopg.errors.InvalidParameterValue
                  | psycopg.errors.InvalidTextRepresentation):
        return FilterError(str(pipelines.refused(error)))
    return pipelines.refused(error)


def hits(rows: list[Any]) -> list[Hit]:
    return [Hit(key, chunk, float(distance), seq) for key, seq, chunk, distance in rows]
