"""`pgembed.AsyncClient`: embeddings and searches for an asyncio application, batched.

`Client.search` embeds each query on its own (one `asyncio.run`, one request upstream). An
async application that serves many users at once calls this client instead: concurrent
`embed` and `search` calls share upstream requests through `pgembed.batcher.Batcher`, read
the shared `pgembed.embedding_cache` (one round trip for the calls of one turn of the event
loop, while their texts wait for their window: a cached text is answered at once), spend the API key's shared budget
(`pgembed.ratelimit`), and fill the cache and record their usage under the caller's labels
(`pgembed.attribution`) right after their callers are answered (`pgembed.recorder`).
`pgembed serve` is an HTTP front on one of these.

The ledger adds up to what the provider billed: a batch's usage rows (one per pipeline and
set of labels in it) share the batch's billed tokens and requests in proportion to their
inputs' own token counts, rounded so that the shares sum to the bill. A caller whose text
was already in flight for another pays nothing: its row counts a cache hit.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from pgembed import db, pipelines
from pgembed.attribution import Attribution
from pgembed.batcher import Batcher, EmbedError, Entry, Observer
from pgembed.cache import chunk_key
from pgembed.providers import ModelSpec, Provider, ProviderError, make_provider
from pgembed.ratelimit import RateLimits
from pgembed.recorder import Recorder
from pgembed.search import Filter, Hit, check_arguments, hits, refusal, search_params
from pgembed.sqlfiles import query
from pgembed.tokens import count_all

# a long window (an application's choice) does not keep cache entries from other processes
_RECORD_DELAY_MAX = 0.020
# per-input messages that blame the provider's answer, not the input (providers' wording)
_PROVIDER_FAULTS = ("embedding API returned", "provider returned")


class UnknownModel(LookupError):
    """A model pgembed.models does not know (HTTP: 404, as OpenAI answers)."""


@dataclass(frozen=True)
class Label:
    """Who one call is for: the usage row it is counted in."""

    pipeline: str | None
    attribution: Attribution


class AsyncClient:
    """A pool on one database and a batcher; use as `async with AsyncClient(dsn) as c:`.

    `window` is the batching window in seconds; `max_batch` caps a batch's inputs below
    the provider's limit; `concurrency` bounds an API provider's requests in flight."""

    def __init__(self, dsn: str, *, window: float = 0.010, max_batch: int | None = None,
                 concurrency: int = 16, pool_size: int = 10, observer: Observer | None = None) -> None:
        db.remember_secrets(dsn)
        self.dsn = dsn
        self.concurrency = concurrency
        self.pool = AsyncConnectionPool(dsn, min_size=1, max_size=pool_size, open=False,
                                        kwargs=db.session_settings("gateway"),
                                        configure=db.register_vector_async)
        self.batcher = Batcher(self._flush, window=window, max_inputs=max_batch, observer=observer,
                               lookup=self._lookup)
        self.recorder = Recorder(self.pool, delay=min(window, _RECORD_DELAY_MAX))
        self._limits = RateLimits(dsn)
        self._providers: dict[ModelSpec, Provider] = {}
        self._models: dict[str, tuple[Any, ...]] = {}

    async def __aenter__(self) -> AsyncClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=30)

    async def aclose(self) -> None:
        await self.batcher.aclose()
        await self.recorder.aclose()
        for provider in self._providers.values():
            await provider.aclose()
        await self._limits.aclose()
        await self.pool.close()

    # ------------------------------------------------------------------ models

    async def spec(self, model: str, dimensions: int | None = None) -> ModelSpec:
        """The model's spec at `dimensions` (None: its native size), from pgembed.models.
        Raises UnknownModel, or ValueError for a size the model cannot give."""
        if model not in self._models:
            async with self.pool.connection() as conn:
                try:
                    row = await (await conn.execute(query("model_info"), {"model": model})).fetchone()
                except psycopg.errors.RaiseException as error:
                    raise UnknownModel(str(pipelines.refused(error))) from None
            assert row is not None
            self._models[model] = tuple(row)
        native, max_input, max_inputs, max_tokens = self._models[model]
        size = native if dimensions is None else dimensions
        if not 1 <= size <= native:
            raise ValueError(f"dimensions must be between 1 and {native} for {model}, not {size}")
        return ModelSpec(model, size, native, max_input, max_inputs, max_tokens)

    def _provider(self, spec: ModelSpec) -> Provider:
        if spec not in self._providers:
            self._providers[spec] = make_provider(spec, limiter=self._limits.for_spec(spec),
                                                  concurrency=self.concurrency)
        return self._providers[spec]

    # --------------------------------------------------------------- embedding

    async def embed(self, texts: Sequence[str], model: str, dimensions: int | None = None,
                    attribution: Attribution | None = None, pipeline: str | None = None,
                    tokens: Sequence[int] | None = None) -> list[np.ndarray]:
        """One float32 vector per text, batched with every concurrent call. Raises
        EmbedError (its `status` says whose fault), UnknownModel, ValueError."""
        spec = await self.spec(model, dimensions)
        return await self.embed_spec(spec, texts, Label(pipeline, attribution or Attribution()), tokens)

    async def embed_spec(self, spec: ModelSpec, texts: Sequence[str], label: Label,
                         tokens: Sequence[int] | None = None) -> list[np.ndarray]:
        """`embed` for a spec already read; `tokens`: the texts' counts, when known."""
        counts = await count_all(texts) if tokens is None else tokens
        return await self.batcher.embed_all(spec, texts, label, counts)

    async def search(self, target: str, text: str | None = None, k: int = 5, filter: Filter | None = None,
                     *, vector: Sequence[float] | np.ndarray | None = None,
                     attribution: Attribution | None = None) -> list[Hit]:
        """`pgembed.search.search`, its query text embedded through the batcher. Raises
        PipelineError (FilterError) for an unknown target or a bad filter, EmbedError."""
        check_arguments(text, vector, k, filter)
        if vector is None:
            assert text is not None
            # resolved once: the text is embedded for, and searched in, the same pipeline even
            # if the alias is repointed meanwhile; no connection is held while it is embedded
            async with self.pool.connection() as conn:
                try:
                    cur = conn.cursor(row_factory=dict_row)
                    p = await (await cur.execute(query("pipeline_resolved"), {"name": target})).fetchone()
                except psycopg.Error as error:
                    raise pipelines.refused(error) from error
            assert p is not None
            target = p["name"]
            spec = await self.spec(p["model"], p["dimensions"])
            vector = (await self.embed_spec(spec, [text], Label(target, attribution or Attribution())))[0]
        array = np.asarray(vector, dtype=np.float32)
        async with self.pool.connection() as conn:
            try:
                rows = await (await conn.execute(query("search"),
                                                 search_params(conn, target, array, k, filter))).fetchall()
            except psycopg.Error as error:
                raise refusal(error) from error
        return hits(rows)

    # ------------------------------------------------------------------- flush

    async def _lookup(self, spec: ModelSpec, entries: list[Entry]) -> None:
        """New texts (of the calls of one loop turn) in the cache, in one round trip: a text
        found is answered now. A cache that cannot be read fails them (503) before anything
        is spent; a vector the recorder has not written yet is found without a query."""
        keys = [chunk_key(spec.model, spec.dimensions, e.text) for e in entries]
        cached = {key: vector for key in keys if (vector := self.recorder.unwritten(key)) is not None}
        unknown = [key for key in keys if key not in cached]
        try:
            if unknown:
                async with self.pool.connection() as conn:
                    rows = await (await conn.execute(query("batch_cache_get"), {"hashes": unknown})).fetchall()
                cached.update((bytes(h), v.to_numpy()) for h, v in rows)
        except Exception as error:
            failure = EmbedError(f"cannot read the embedding cache: {error}", 503)
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(failure)
            return
        for entry, key in zip(entries, keys, strict=True):
            if key in cached and not entry.future.done():
                entry.future.set_result(cached[key])

    async def _flush(self, spec: ModelSpec, entries: list[Entry]) -> None:
        """One batch, its cache lookups done: the texts nobody found go upstream in one call,
        every future settled as soon as its vector is known; the cache entries and the
        ledger's rows are the recorder's, written after the answers."""
        keys = [chunk_key(spec.model, spec.dimensions, e.text) for e in entries]
        misses = [i for i, entry in enumerate(entries) if not entry.future.done()]
        self.batcher.observer.cache(len(entries) - len(misses), len(misses))
        billed = Bill()
        new: list[tuple[bytes, np.ndarray, int]] = []
        if misses:
            started = time.perf_counter()
            try:
                result = await self._provider(spec).embed([entries[i].text for i in misses])
            except ProviderError as error:
                for i in misses:
                    entries[i].future.set_exception(EmbedError(str(error), 503))
                result = None
            self.batcher.observer.upstream(time.perf_counter() - started)
            if result is not None:
                billed = Bill(result.tokens, result.requests)
                counts = result.token_counts or [entries[i].tokens for i in misses]
                for j, i in enumerate(misses):
                    entry, vector, problem = entries[i], result.vectors[j], result.errors[j]
                    if vector is None:
                        status = 502 if (problem or "").startswith(_PROVIDER_FAULTS) else 400
                        entry.future.set_exception(EmbedError(problem or "no vector", status))
                        continue
                    array = np.asarray(vector, dtype=np.float32)
                    entry.future.set_result(array)
                    new.append((keys[i], array, counts[j]))
                billed.weights = {i: counts[j] for j, i in enumerate(misses)}
        self._record(spec, entries, set(misses), new, billed)

    def _record(self, spec: ModelSpec, entries: list[Entry], misses: set[int],
                new: list[tuple[bytes, np.ndarray, int]], billed: Bill) -> None:
        groups: dict[Hashable, Usage] = defaultdict(Usage)
        for i, entry in enumerate(entries):
            payer, *others = entry.labels or [None]
            row = groups[payer]
            if i in misses:
                row.misses += 1
                row.weight += billed.weights.get(i, 0)
            else:
                row.hits += 1
            for other in others:
                groups[other].hits += 1
        labels = list(groups)
        weights = [groups[label].weight for label in labels]
        tokens = apportion(billed.tokens, weights)
        requests = apportion(billed.requests, weights)
        params = [_usage_row(spec, label, groups[label], t, r)
                  for label, t, r in zip(labels, tokens, requests, strict=True)]
        self.recorder.add([{"hash": key, "model": spec.model, "dimensions": spec.dimensions,
                            "embedding": vector, "tokens": count} for key, vector, count in new], params)


@dataclass
class Bill:
    """What the provider billed for one batch, and each sent input's share of it."""

    tokens: int = 0
    requests: int = 0
    weights: dict[int, int] = field(default_factory=dict)


@dataclass
class Usage:
    hits: int = 0
    misses: int = 0
    weight: int = 0


def apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, in whole numbers that sum to it (largest
    remainders first); all of it to the first share when every weight is zero."""
    if not weights:
        return []
    whole = sum(weights)
    if whole <= 0:
        return [total] + [0] * (len(weights) - 1)
    shares = [total * w // whole for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (total * weights[i]) % whole, reverse=True)
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _usage_row(spec: ModelSpec, label: Hashable, usage: Usage, tokens: int, requests: int) -> dict[str, Any]:
    pipeline, attribution = (label.pipeline, label.attribution) if isinstance(label, Label) else (None, Attribution())
    return {"pipeline": pipeline, "model": spec.model, **attribution.usage_params(),
            "requests": requests, "inputs": usage.misses, "tokens": tokens,
            "cache_hits": usage.hits, "cache_misses": usage.misses}
