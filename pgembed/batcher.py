"""Adaptive batching: concurrent single embeddings become one upstream request.

An application's queries arrive one at a time, each a text; an embedding API answers a
list of 2,048 in about the time it answers one, and bills the same tokens. So each call
waits at most one window (10 ms by default) for others with the same model and size, and
the lane is flushed as one batch when the window ends or when one more text would pass the
provider's input or token limit (`ModelSpec.max_batch_inputs`, `max_batch_tokens`, counted
with `pgembed.tokens.count_tokens` as the provider counts). A text already waiting or in
flight is not sent again: its second caller awaits the first one's future.

A `Lookup` (the embedding cache's) starts the moment a call's texts arrive, while they wait
for their window: a text it finds is answered at once, not after the window, and the flush
sends upstream only the texts nobody found (and still counts the others, for the ledger). A
text answered from the cache stays in its lane until the flush, so that a second caller
within the window gets the same vector and is counted too.

The batcher knows nothing of the cache's table, the ledger or HTTP: the `Flush` it is given embeds a
batch and settles every entry's future (a vector, or the exception for that input alone),
so that one rejected text never fails its batch-mates. `pgembed.aio.AsyncClient` gives it
one that reads the cache and records usage; the gateway serves HTTP through that client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pgembed.providers import ModelSpec
from pgembed.tokens import count_tokens

log = logging.getLogger("pgembed.batcher")

#: asyncio's timers fire up to a millisecond late (epoll waits in whole milliseconds, rounded
#: up, and the loop wakes after that): a window's timer is set this much short of it, so that
#: a text waits about the window, not the window and a tick
_TIMER_TICK = 0.001


class EmbedError(Exception):
    """One input could not be embedded; `status` is how an HTTP caller hears it (400: the
    input is at fault, 502: the provider answered nonsense, 503: the provider is down)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(eq=False)
class Entry:
    """One distinct text of a lane; `labels` are its callers', the first one's pays."""

    text: str
    tokens: int
    future: asyncio.Future[np.ndarray]
    labels: list[Hashable] = field(default_factory=list)
    sent: bool = False  # its batch is flushed: a later caller makes a new entry
    looked_up: asyncio.Future[None] | None = None  # the cache lookup that may answer it first


Flush = Callable[[ModelSpec, list[Entry]], Awaitable[None]]
#: settles the futures of the entries it finds (a vector), or of all of them (an EmbedError)
Lookup = Callable[[ModelSpec, list[Entry]], Awaitable[None]]


class Observer(Protocol):
    """What the gateway's metrics hear of the batcher and of its flush."""

    def batch(self, size: int, waited: float) -> None: ...

    def cache(self, hits: int, misses: int) -> None: ...

    def upstream(self, seconds: float) -> None: ...


class Unobserved:
    """The observer of a batcher nobody watches (the in-process client's)."""

    def batch(self, size: int, waited: float) -> None:
        pass

    def cache(self, hits: int, misses: int) -> None:
        pass

    def upstream(self, seconds: float) -> None:
        pass


@dataclass
class _Lane:
    entries: list[Entry] = field(default_factory=list)
    tokens: int = 0
    opened: float = 0.0
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Lanes of one model and size each; see the module docstring. `max_inputs` caps a
    batch below the provider's own limit (None: the provider's)."""

    def __init__(self, flush: Flush, *, window: float = 0.010, max_inputs: int | None = None,
                 observer: Observer | None = None, lookup: Lookup | None = None) -> None:
        if window < 0:
            raise ValueError("the batching window cannot be negative")
        self._flush = flush
        self._lookup = lookup
        self.window = window
        self.max_inputs = max_inputs
        self.observer: Observer = observer or Unobserved()
        self._lanes: dict[ModelSpec, _Lane] = {}
        self._known: dict[tuple[ModelSpec, str], Entry] = {}  # waiting or in flight
        self._running: set[asyncio.Task[None]] = set()
        # per lane, the entries of a lookup about to start, and its task
        self._gathering: dict[ModelSpec, tuple[list[Entry], asyncio.Task[None]]] = {}

    @property
    def depth(self) -> int:
        """Distinct texts waiting for their window or in flight upstream."""
        return len(self._known)

    async def embed(self, spec: ModelSpec, text: str, label: Hashable = None, tokens: int | None = None) -> np.ndarray:
        """The text's vector, embedded with the other texts of its window. `tokens`: its
        count, when the caller has it (`count_all`). Raises EmbedError."""
        return (await self.embed_all(spec, [text], label, None if tokens is None else [tokens]))[0]

    async def embed_all(self, spec: ModelSpec, texts: Sequence[str], label: Hashable = None,
                        tokens: Sequence[int] | None = None) -> list[np.ndarray]:
        """`embed` for one call's texts: one cache lookup for those not already waiting or
        in flight. Raises EmbedError (the first failed text's)."""
        counts = [count_tokens(text) for text in texts] if tokens is None else tokens
        entries: list[Entry] = []
        new: list[Entry] = []
        for text, count in zip(texts, counts, strict=True):
            entry = self._known.get((spec, text))
            if entry is None or (entry.sent and entry.future.done()):
                entry = self._add(spec, text, count)
                new.append(entry)
            entry.labels.append(label)
            entries.append(entry)
        if new and self._lookup is not None:
            self._look_up(spec, new)
        # shielded: a caller that goes away (a client disconnecting) leaves the future to the others
        return list(await asyncio.gather(*(asyncio.shield(entry.future) for entry in entries)))

    def _look_up(self, spec: ModelSpec, entries: list[Entry]) -> None:
        """The calls of one turn of the event loop share a lookup (under load, one query
        for many requests); attached before anything yields, so that a flush finds it."""
        if spec not in self._gathering:
            group: list[Entry] = []
            self._gathering[spec] = group, asyncio.ensure_future(self._look_up_group(spec, group))
        group, task = self._gathering[spec]
        group += entries
        for entry in entries:
            entry.looked_up = task

    async def _look_up_group(self, spec: ModelSpec, group: list[Entry]) -> None:
        await asyncio.sleep(0)  # the other calls of this turn join the group
        del self._gathering[spec]
        assert self._lookup is not None
        await self._lookup(spec, group)

    def _add(self, spec: ModelSpec, text: str, tokens: int) -> Entry:
        lane = self._lanes.setdefault(spec, _Lane())
        limit = min(spec.max_batch_inputs, self.max_inputs or spec.max_batch_inputs)
        if lane.entries and (len(lane.entries) >= limit or lane.tokens + tokens > spec.max_batch_tokens):
            self._send(spec, lane)
        loop = asyncio.get_running_loop()
        entry = Entry(text, tokens, loop.create_future())
        self._known[spec, text] = entry
        if not lane.entries:
            lane.opened = time.perf_counter()
            lane.timer = loop.call_later(max(0.0, self.window - _TIMER_TICK), self._send, spec, lane)
        lane.entries.append(entry)
        lane.tokens += tokens
        if len(lane.entries) >= limit:
            self._send(spec, lane)
        return entry

    def _send(self, spec: ModelSpec, lane: _Lane) -> None:
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        entries, lane.entries, lane.tokens = lane.entries, [], 0
        if not entries:
            return
        for entry in entries:
            entry.sent = True
        self.observer.batch(len(entries), time.perf_counter() - lane.opened)
        task = asyncio.get_running_loop().create_task(self._run(spec, entries))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, spec: ModelSpec, entries: list[Entry]) -> None:
        try:
            await asyncio.gather(*{e.looked_up for e in entries if e.looked_up is not None})
            live = [e for e in entries if not _failed(e)]
            if live:
                await self._flush(spec, live)
        except Exception as error:  # the flush's own failure: every caller still waiting hears it
            # logged: after its callers were answered (the cache or ledger write) nobody else would
            log.warning("a batch of %d %s texts failed: %s", len(entries), spec.model, error)
            failure = error if isinstance(error, EmbedError) else EmbedError(f"cannot embed: {error}", 503)
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(failure)
        finally:
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(EmbedError("the batch ended without an answer", 502))
                # retrieved here: when every caller went away, asyncio would log it as never retrieved
                entry.future.exception()
                if self._known.get((spec, entry.text)) is entry:
                    del self._known[spec, entry.text]

    async def aclose(self) -> None:
        """Flush every lane now and wait for the batches in flight."""
        for spec, lane in list(self._lanes.items()):
            self._send(spec, lane)
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


def _failed(entry: Entry) -> bool:
    """The lookup could not read the cache for it: its callers have their error already."""
    return entry.future.done() and entry.future.exception() is not None
