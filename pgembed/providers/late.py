"""Late chunking: one vector per chunk, pooled from one run of the model over its document.

A chunk embedded on its own knows nothing of the text around it ("it", "the drug", "this
study" stay unresolved). Here the model reads the whole document and each chunk's vector is
the mean of the last hidden states of its own tokens, normalised as the plain path's
vectors are, so it carries its document's context.

A document longer than the model's window is read window by window. Windows are the
window's size less the special tokens, and overlap by half: each starts half a window after
the one before, the last ends at the document's end. Every token takes its state from the
window in which it sits furthest from an edge, so each has at least a quarter of a window of
context on either side, short of the document's own ends. Windows of all the documents of a
call are run in batches of like length, each window wrapped in the model's special tokens
([CLS] … [SEP]) as the model was trained.

A token belongs to a chunk when their character ranges overlap; special tokens belong to
none. Both runtimes (pgembed.providers.local's TorchModel, pgembed.providers.bert's
BertEncoder) give the states through `hidden_states`; what is done with them is here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

Span = tuple[int, int]  # [start, end) characters of a document
BATCH = 32


class StateModel(Protocol):
    tokenizer: Any  # a tokenizers.Tokenizer without truncation or padding

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


@dataclass
class Pooled:
    """A document's chunks: unit vectors (None where a span holds no token), the tokens in
    each span, and the tokens the model read for the document (special tokens once)."""

    vectors: list[np.ndarray | None]
    span_tokens: list[int]
    tokens: int


def windows(count: int, width: int) -> list[Span]:
    """[start, end) token ranges of width `width` (the last may be shorter only when the
    document is), half a window apart, covering `count` tokens."""
    if count <= width:
        return [(0, count)]
    stride = max(width // 2, 1)
    starts = [*range(0, count - width, stride), count - width]
    return [(s, s + width) for s in starts]


def owners(count: int, ranges: list[Span]) -> np.ndarray:
    """For each token, the window in which it is furthest from an edge."""
    at = np.arange(count)[:, None]
    starts = np.array([s for s, _ in ranges])[None, :]
    ends = np.array([e for _, e in ranges])[None, :]
    room = np.minimum(at - starts, ends - 1 - at)
    room = np.where((at >= starts) & (at < ends), room, -1)
    return np.asarray(room.argmax(axis=1))


def _edges(mask: list[int]) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text."""
    lead = next((i for i, m in enumerate(mask) if not m), len(mask))
    trail = next((i for i, m in enumerate(reversed(mask)) if not m), 0)
    return lead, trail


def embed_spans(model: StateModel, documents: list[tuple[str, list[Span]]], window: int) -> list[Pooled]:
    """One Pooled per document, its vectors in the order of its spans. `window` is what
    the model reads at once, special tokens included."""
    encodings = model.tokenizer.encode_batch([text for text, _ in documents])
    inputs: list[tuple[int, Span, list[int]]] = []  # (document, token range, ids to run)
    layout = []
    for d, e in enumerate(encodings):
        lead, trail = _edges(e.special_tokens_mask)
        ids = e.ids
        inner = ids[lead:len(ids) - trail]
        ranges = windows(len(inner), max(window - lead - trail, 1))
        layout.append((lead, trail, ranges))
        inputs += [(d, r, ids[:lead] + inner[r[0]:r[1]] + ids[len(ids) - trail:]) for r in ranges]
    states = _run(model, [ids for _, _, ids in inputs])
    by_document: dict[int, dict[Span, np.ndarray]] = {}
    for (d, r, _), state in zip(inputs, states, strict=True):
        lead = layout[d][0]
        by_document.setdefault(d, {})[r] = state[lead:lead + r[1] - r[0]]
    return [_pool(encodings[d], layout[d], by_document.get(d, {}), spans)
            for d, (_, spans) in enumerate(documents)]


def _run(model: StateModel, inputs: list[list[int]]) -> list[np.ndarray]:
    """Each input's last hidden states (one row a token), batched by length."""
    out: list[np.ndarray] = [np.empty(0)] * len(inputs)
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    for start in range(0, len(order), BATCH):
        picked = order[start:start + BATCH]
        width = max(len(inputs[i]) for i in picked)
        ids = np.zeros((len(picked), width), dtype=np.int64)
        mask = np.zeros((len(picked), width), dtype=np.int64)
        for row, i in enumerate(picked):
            ids[row, :len(inputs[i])] = inputs[i]
            mask[row, :len(inputs[i])] = 1
        states = model.hidden_states(ids, mask)
        for row, i in enumerate(picked):
            out[i] = states[row, :len(inputs[i])]
    return out


def _pool(encoding: Any, layout: tuple[int, int, list[Span]], states: dict[Span, np.ndarray],
          spans: list[Span]) -> Pooled:
    lead, trail, ranges = layout
    offsets = np.array(encoding.offsets[lead:len(encoding.ids) - trail], dtype=np.int64).reshape(-1, 2)
    count = len(offsets)
    if not count:
        return Pooled([None] * len(spans), [0] * len(spans), lead + trail)
    who = owners(count, ranges)
    token_states = np.empty((count, next(iter(states.values())).shape[1]), dtype=np.float32)
    for w, r in enumerate(ranges):
        mine = np.nonzero(who == w)[0]
        token_states[mine] = states[r][mine - r[0]]
    vectors: list[np.ndarray | None] = []
    span_tokens = []
    for start, end in spans:
        inside = (offsets[:, 0] < end) & (offsets[:, 1] > start)
        span_tokens.append(int(inside.sum()))
        if not inside.any():
            vectors.append(None)
            continue
        mean = token_states[inside].mean(axis=0)
        vectors.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return Pooled(vectors, span_tokens, count + lead + trail)
