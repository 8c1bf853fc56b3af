"""Turns one claimed batch into outcomes: chunks with vectors, or a reason per row.

No database transaction is open while this runs: the provider call may take seconds, and
DESIGN rule 1 says application writes never wait on it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from pgembed.cache import chunk_key, document_hash, late_chunk_key
from pgembed.providers import EmbedResult, Provider, ProviderError
from pgembed.providers.base import late_chunker, sound_vectors
from pgembed.queue import Batch, Chunk, Key, Outcome, PipelineInfo, Queue, SourceRow, Usage
from pgembed.splitting import Piece, counter_for, document

# what counts as blank, here and in the audit's gap query (pgembed.gap_sql, kind 'empty')
_BLANK = " \t\n\r\f\v"


@dataclass(frozen=True)
class Planned:
    """A chunk to embed: its text, its cache key, whether it is a truncated text's start;
    for late chunking, the document the model reads and the chunk's span in it."""

    text: str
    hash: bytes
    truncated: bool = False
    document: str = ""
    span: tuple[int, int] = (0, 0)


@dataclass
class Embedded:
    outcomes: list[Outcome]
    new_cache: dict[bytes, tuple[np.ndarray, int]]
    usage: list[Usage]
    sent: list[bytes] = field(default_factory=list)  # hashes this batch asked the provider for


def _texts(info: PipelineInfo, content: str | None) -> tuple[str, list[Piece]]:
    """What the model reads of a row and its chunks. NULL or blank content has none: the
    row has nothing to embed, which is not a failure; its old vectors (of content that no
    longer exists) go, and the audit counts it as empty, not missing."""
    if content is None or not content.strip(_BLANK):
        return "", []
    if info.chunking == "none" and not info.prefixed:
        return content, [Piece(content, span=(0, len(content)))]
    return document(info.plan, counter_for(info.spec, info.tokenizer), content, info.prefixed)


def pieces(info: PipelineInfo, content: str | None) -> list[Piece]:
    """The chunks of a row's content: the worker's, and a dry run's (pgembed.estimate)."""
    return _texts(info, content)[1]


def _planned(info: PipelineInfo, row: SourceRow) -> list[Planned]:
    """A row's chunks with their cache keys. A late-chunked chunk's vector depends on its
    whole document, so its key covers the document and the span (and is never a plain
    chunk's: see pgembed.cache)."""
    text, chunks = _texts(info, row.content)
    model, dimensions = info.spec.model, info.spec.dimensions
    if info.late_chunking:
        return [Planned(p.text, late_chunk_key(model, dimensions, text, p.span), p.truncated, text, p.span)
                for p in chunks]
    return [Planned(p.text, chunk_key(model, dimensions, p.text), p.truncated) for p in chunks]


def _plan(info: PipelineInfo, batch: Batch, rows: list[SourceRow],
          read_errors: dict[Key, str]) -> tuple[list[Outcome], dict[Key, list[Planned]]]:
    by_key = {r.key: r for r in rows}
    outcomes, texts = [], {}
    for claimed in batch.rows:
        outcome = Outcome(claimed)
        outcomes.append(outcome)
        row = by_key.get(claimed.key)
        if claimed.key in read_errors:
            outcome.error = read_errors[claimed.key]
        elif row is None or not row.found:
            outcome.gone = True
        else:
            outcome.cost_center = row.cost_center
            outcome.content_hash = document_hash(row.content or "")
            texts[claimed.key] = _planned(info, row)
    return outcomes, texts


class InFlight:
    """The texts a worker is embedding, from the request until the acknowledgement has put
    them in the cache. Two of its batches that need the same text in that window send it
    once: the second waits for the first's answer, and counts it as a cache hit."""

    def __init__(self) -> None:
        # hash -> (vector, the text's error, the whole request's error)
        self._answers: dict[bytes, asyncio.Future[tuple[np.ndarray | None, str | None, str | None]]] = {}

    def claim(self, hashes: list[bytes]) -> tuple[list[bytes], dict[bytes, asyncio.Future]]:
        """Splits hashes into those this batch sends and those another batch is sending."""
        mine = [h for h in hashes if h not in self._answers]
        theirs = {h: self._answers[h] for h in hashes if h in self._answers}
        loop = asyncio.get_running_loop()
        for h in mine:
            self._answers[h] = loop.create_future()
        return mine, theirs

    def settle(self, mine: list[bytes], fresh: dict[bytes, np.ndarray], failed: dict[bytes, str],
               outage: str | None = None) -> None:
        for h in mine:
            answer = self._answers[h]
            if not answer.done():
                answer.set_result((fresh.get(h), failed.get(h), outage))

    def forget(self, hashes: list[bytes]) -> None:
        """Once the cache holds them (or the request failed), later batches look there."""
        for h in hashes:
            self._answers.pop(h, None)


async def planned(info: PipelineInfo, batch: Batch, queue: Queue) -> tuple[list[Outcome], dict[Key, list[Planned]]]:
    """The batch's rows read and cut into chunks with their cache keys: what embed_batch
    embeds, and what a provider batch sends (pgembed.batch_api)."""
    rows, read_errors = await queue.read(info, [c.key for c in batch.rows])
    # chunking long rows takes milliseconds each: off the event loop, like the embedding
    return await asyncio.to_thread(_plan, info, batch, rows, read_errors)


async def embed_batch(info: PipelineInfo, batch: Batch, queue: Queue, provider: Provider,
                      requests: asyncio.Semaphore, inflight: InFlight) -> Embedded:
    """`requests` bounds the provider calls in flight; reading and the cache look-up run
    outside it, so the next batch is ready when a request slot frees up."""
    outcomes, texts = await planned(info, batch, queue)
    wanted = {c.hash: c for chunks in texts.values() for c in chunks}
    cached = await queue.cached(list(wanted))
    mine, theirs = inflight.claim([h for h in wanted if h not in cached])
    if info.late_chunking:
        mine = _by_document(mine, wanted)
    result = EmbedResult([], [])
    try:
        if mine:
            result = await _embed_within(provider, requests,
                                         lambda: _request(provider, info.late_chunking, mine, wanted))
    except BaseException as error:
        inflight.settle(mine, {}, {}, outage=str(error) or type(error).__name__)
        inflight.forget(mine)
        raise
    fresh, failed, new_cache = _collect(mine, result, info.spec.dimensions)
    inflight.settle(mine, fresh, failed)
    for h, answer in theirs.items():
        vector, problem, outage = await answer
        if outage is not None:
            raise ProviderError(f"the request that was embedding the same text failed: {outage}")
        if vector is None:
            failed[h] = problem or "provider returned no vector"
        else:
            cached[h] = vector
    for outcome in outcomes:
        chunks = texts.get(outcome.claimed.key)
        if chunks is not None:
            _assemble(outcome, chunks, cached, fresh, failed)
    usage = _attribute(outcomes, texts, mine, cached, failed, result)
    return Embedded(outcomes, new_cache, usage, sent=mine)


async def _embed_within(provider: Provider, requests: asyncio.Semaphore,
                        call: Callable[[], Awaitable[EmbedResult]]) -> EmbedResult:
    """A provider that bounds its own HTTP requests (`bounds_requests`) holds a request slot
    only while a request is out: counting tokens before it and decoding after it overlap
    other requests. Any other provider's whole call is one request."""
    if getattr(provider, "bounds_requests", False):
        return await call()
    async with requests:
        return await call()


def _by_document(hashes: list[bytes], wanted: dict[bytes, Planned]) -> list[bytes]:
    """The hashes with those of one document together, as a late-chunking request answers."""
    groups: dict[str, list[bytes]] = {}
    for h in hashes:
        groups.setdefault(wanted[h].document, []).append(h)
    return [h for group in groups.values() for h in group]


async def _request(provider: Provider, late: bool, sent: list[bytes], wanted: dict[bytes, Planned]) -> EmbedResult:
    """The provider's answer for `sent`, in its order: the chunks' texts, or (late chunking)
    each document once with the spans of its chunks that are not cached."""
    if not late:
        return await provider.embed([wanted[h].text for h in sent])
    documents: dict[str, list[tuple[int, int]]] = {}
    for h in sent:
        documents.setdefault(wanted[h].document, []).append(wanted[h].span)
    return await late_chunker(provider).embed_late(list(documents.items()))


def _collect(sent: list[bytes], result: EmbedResult, dimensions: int) -> tuple[
        dict[bytes, np.ndarray], dict[bytes, str], dict[bytes, tuple[np.ndarray, int]]]:
    """The provider's answer per hash: vectors, per-text errors, and the new cache entries.
    Every vector is checked here, whichever provider sent it: one that cannot be stored
    (wrong size, NaN, out of float4's range, all zeros) is its text's failure, never a
    crash of the acknowledgement that would bring the batch back to crash again."""
    fresh: dict[bytes, np.ndarray] = {}
    failed: dict[bytes, str] = {}
    new_cache: dict[bytes, tuple[np.ndarray, int]] = {}
    matrix, problems = sound_vectors(result.vectors[:len(sent)], dimensions)
    for i, h in enumerate(sent):
        if result.vectors[i] is None:
            failed[h] = result.errors[i] or "provider returned no vector"
            continue
        problem = problems[i]
        if problem is not None:
            failed[h] = problem
            continue
        fresh[h] = matrix[i]
        tokens = result.token_counts[i] if i < len(result.token_counts) else 0
        new_cache[h] = (fresh[h], tokens)
    return fresh, failed, new_cache


def _assemble(outcome: Outcome, chunks: list[Planned], cached: dict[bytes, np.ndarray],
              fresh: dict[bytes, np.ndarray], failed: dict[bytes, str]) -> None:
    for seq, c in enumerate(chunks):
        if c.hash in failed:
            where = f"chunk {seq}: " if len(chunks) > 1 else ""
            outcome.error = f"{where}{failed[c.hash]}"
            outcome.chunks = []
            return
        vector = cached[c.hash] if c.hash in cached else fresh[c.hash]
        outcome.chunks.append(Chunk(seq, c.text, c.hash, vector, c.truncated))


def _attribute(outcomes: list[Outcome], texts: dict[Key, list[Planned]],
               misses: list[bytes], cached: dict[bytes, np.ndarray],
               failed: dict[bytes, str], result: EmbedResult) -> list[Usage]:
    """Splits the batch's cost by (purpose, cost center): each text is charged to the first
    row that asked for it; the provider's own token total is what gets split, so usage adds
    up to what the API billed."""
    counts = dict(zip(misses, result.token_counts or [0] * len(misses), strict=False))
    groups: dict[tuple[str, str | None], Usage] = {}
    charged: set[bytes] = set()
    weights: dict[tuple[str, str | None], int] = defaultdict(int)
    # when every text failed but the answers were billed anyway (garbage), split by asks
    fallback: dict[tuple[str, str | None], int] = defaultdict(int)
    for outcome in outcomes:
        group = (outcome.claimed.purpose, outcome.cost_center)
        usage = groups.setdefault(group, Usage(*group))
        for h in (c.hash for c in texts.get(outcome.claimed.key, [])):
            if h in cached or h in charged or h not in counts:
                usage.cache_hits += 1
                continue
            charged.add(h)
            usage.cache_misses += 1
            fallback[group] += max(counts[h], 1)
            if h in failed:
                continue  # never billed; re-sends are added to the heaviest group below
            usage.inputs += 1
            weights[group] += max(counts[h], 1)
    if misses and groups:
        _split_totals(groups, weights if any(weights.values()) else fallback, result)
    return [u for u in groups.values() if u.inputs or u.cache_hits or u.cache_misses or u.requests]


def _split_totals(groups: dict[tuple[str, str | None], Usage],
                  weights: dict[tuple[str, str | None], int], result: EmbedResult) -> None:
    total_weight = sum(weights.values()) or 1
    heaviest = max(groups, key=lambda g: weights.get(g, 0))
    for group, usage in groups.items():
        usage.tokens = result.tokens * weights.get(group, 0) // total_weight
    groups[heaviest].tokens += result.tokens - sum(u.tokens for u in groups.values())
    groups[heaviest].requests = result.requests
    # inputs actually sent (retries, bisection) beyond one per text go to the heaviest too
    groups[heaviest].inputs += result.inputs_sent - sum(u.inputs for u in groups.values())
