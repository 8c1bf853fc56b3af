"""A backfill's dry run: what embedding every row of a source with a model would take,
before anything is paid.

It does what a worker would, short of the request: reads each row's content as the
pipeline's reader does (the bound expression, under the pinned settings), cuts it into the
chunks the worker would make for the model (pgembed.batch.pieces), asks the cache which of
their keys it holds, and counts the rest the way the provider bills them (a local model's
own tokenizer with its special tokens, cl100k for OpenAI's models, words for hash:N). So
what a migration then records in pgembed.usage matches it; a text two rows share is paid
for once, as the cache makes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from pgembed.batch import pieces
from pgembed.cache import chunk_key
from pgembed.pipelines import PipelineOptions
from pgembed.providers import ModelSpec
from pgembed.queue import PipelineInfo
from pgembed.ratelimit import openai_bucket
from pgembed.sqlfiles import query

# rows read and cache keys looked up per round trip
SLICE = 2000


@dataclass(frozen=True)
class Target:
    """What a backfill would run: a source's bound content and the new pipeline's model and
    chunking, as pgembed.migration_target returns them."""

    source: str
    content_bound: str
    info: PipelineInfo
    usd_per_1m_tokens: Decimal


@dataclass(frozen=True)
class Estimate:
    rows: int
    empty_rows: int      # NULL or blank content: nothing to embed
    chunks: int
    cached_chunks: int   # in the cache already (or repeated in the table): free
    cached_rows: int     # rows every chunk of which is free
    tokens: int          # what the provider would bill for the rest
    requests: int
    usd: Decimal
    seconds: float | None  # at the rate budget of the model's API key; None: not limited

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["usd"] = float(self.usd)
        return document


def billing_counter(spec: ModelSpec) -> Callable[[list[str]], list[int]]:
    """Tokens per text as the model's provider bills them."""
    if spec.provider == "local":
        from pgembed.providers.local import load_model, resolve_model

        model = load_model(resolve_model(spec.name))
        return model.token_counts
    if spec.provider == "hash":
        from pgembed.providers.hashing import token_count as words

        return lambda texts: [words(t) for t in texts]
    from pgembed.tokens import count_tokens

    return lambda texts: [count_tokens(t) for t in texts]


def _target(row: tuple[Any, ...]) -> Target:
    """A Target from the columns pgembed.model_target returns."""
    (source, content_bound, prefixed, model, dims, native, chunking, chunk_tokens, chunk_overlap, tokenizer,
     price, max_input, max_inputs, max_tokens) = row
    spec = ModelSpec(model=model, dimensions=dims, native_dimensions=native, max_input_tokens=max_input,
                     max_batch_inputs=max_inputs, max_batch_tokens=max_tokens)
    info = PipelineInfo(name="(dry run)", id=0, spec=spec, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
                        chunking=chunking, tokenizer=tokenizer, prefixed=prefixed)
    return Target(source, content_bound, info, price)


def migration_target(conn: psycopg.Connection, alias: str, model: str, dimensions: int | None) -> Target:
    """The checked target of a migration (an unknown alias, a running migration, the same
    model are refused here, in SQL)."""
    row = conn.execute(query("migration_target"),
                       {"alias": alias, "model": model, "dimensions": dimensions}).fetchone()
    assert row is not None  # a set-returning function that raises or returns one row
    return _target(row[1:])


def backfill_target(conn: psycopg.Connection, table: str, content: str, model: str,
                    options: PipelineOptions) -> Target:
    """The target of create_pipeline with these arguments, checked as it checks them."""
    row = conn.execute(query("backfill_target"), {
        "source": table, "content": content, "model": model, "dimensions": options.dimensions,
        "chunking": options.chunking, "chunk_tokens": options.chunk_tokens,
        "chunk_overlap": options.chunk_overlap, "chunk_prefix": options.chunk_prefix}).fetchone()
    assert row is not None
    return _target(row)


def _contents(conn: psycopg.Connection, target: Target) -> Iterator[list[str | None]]:
    """The rows' content in slices, rendered as the reader renders it (pinned settings),
    through a server-side cursor in a transaction of its own."""
    statement = sql.SQL("SELECT ({})::text FROM {}").format(sql.SQL(target.content_bound),  # type: ignore[arg-type]
                                                           sql.SQL(target.source))  # type: ignore[arg-type]
    with conn.transaction():
        conn.execute(query("pin_settings"))
        with conn.cursor(name="pgembed_dry_run") as cur:
            cur.execute(statement)
            while rows := cur.fetchmany(SLICE):
                yield [r[0] for r in rows]


def _cached(conn: psycopg.Connection, hashes: list[bytes]) -> set[bytes]:
    found: set[bytes] = set()
    for start in range(0, len(hashes), SLICE):
        rows = conn.execute(query("cache_has"), {"hashes": hashes[start:start + SLICE]}).fetchall()
        found.update(bytes(r[0]) for r in rows)
    return found


def _seconds(conn: psycopg.Connection, spec: ModelSpec, tokens: int, requests: int) -> float | None:
    """Time at the rate budget of the key a worker would use; None when nothing limits it
    (no budget, or a provider that calls no API)."""
    if spec.provider != "openai" or not tokens:
        return None
    row = conn.execute(query("rate_limit_of"), {"bucket": openai_bucket()}).fetchone()
    if row is None:
        return None
    max_requests, max_tokens, per_seconds = row
    waits = [tokens * per_seconds / max_tokens if max_tokens else 0.0,
             requests * per_seconds / max_requests if max_requests else 0.0]
    return max(waits) if any(waits) else None


def estimate(conn: psycopg.Connection, target: Target) -> Estimate:
    """The dry run of embedding every row of the target's source."""
    info = target.info
    rows = empty = cached_rows = 0
    keys_of_rows: list[list[bytes]] = []
    texts: dict[bytes, str] = {}
    for contents in _contents(conn, target):
        for content in contents:
            rows += 1
            chunks = pieces(info, content)
            if not chunks:
                empty += 1
                continue
            keys = [chunk_key(info.spec.model, info.spec.dimensions, p.text) for p in chunks]
            keys_of_rows.append(keys)
            for key, piece in zip(keys, chunks, strict=True):
                texts.setdefault(key, piece.text)
    cached = _cached(conn, list(texts))
    chunk_count = sum(len(k) for k in keys_of_rows)
    cached_rows = sum(1 for keys in keys_of_rows if all(k in cached for k in keys))
    to_pay = [texts[k] for k in texts if k not in cached]
    tokens = sum(billing_counter(info.spec)(to_pay)) if to_pay else 0
    requests = math.ceil(len(to_pay) / info.spec.max_batch_inputs)
    usd = Decimal(tokens) * target.usd_per_1m_tokens / Decimal(1_000_000)
    return Estimate(rows=rows, empty_rows=empty, chunks=chunk_count, cached_chunks=chunk_count - len(to_pay),
                    cached_rows=cached_rows, tokens=tokens, requests=requests, usd=usd,
                    seconds=_seconds(conn, info.spec, tokens, requests))
