"""Cut a row's content into chunks that fit the model, counted with the model's tokenizer.

A model reads a fixed number of tokens (all-MiniLM-L6-v2: 256, [CLS] and [SEP] included);
a text longer than that is either refused (a failure) or cut silently (only its start is
matched). So every chunk is measured in the tokens of the model that embeds it: a local
model's own tokenizer (WordPiece for MiniLM), cl100k for OpenAI's models, cl100k with a
quarter of the window kept free for a model that declared no tokenizer.

The strategies (pgembed.pipelines.chunking):

- `recursive`: the largest units that fit, paragraphs, then sentences, then words
  (semantic-text-splitter's TextSplitter), neighbours sharing up to `overlap` tokens;
- `markdown`: the same over Markdown structure: headings, lists, code blocks kept whole
  where they fit (MarkdownSplitter);
- `tokens`: cl100k windows of exactly `chunk_tokens` (pgembed.chunking), what pipelines
  made before this existed keep;
- `truncate`: the text's start only, flagged as truncated;
- `none`: the text whole; too long for the model, it fails.

Content that fits in one chunk is that one chunk, verbatim: no whitespace trimmed, so short
rows embed exactly as they did before chunking existed. The splitters are deterministic:
unchanged text gives the same chunks, whose cache keys then hit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from semantic_text_splitter import MarkdownSplitter, TextSplitter

from pgembed.chunking import chunk_spans
from pgembed.providers.base import ModelSpec
from pgembed.tokens import count_tokens

STRATEGIES = ("recursive", "markdown", "tokens", "truncate", "none")
# between a chunk prefix and the content in what the reader returns (pgembed.prefixed_content)
SEPARATOR = "\x1e"
# The tiktoken model whose encoding (cl100k_base) the splitter's Rust side bundles: no network.
CL100K_MODEL = "text-embedding-3-small"


@dataclass(frozen=True)
class Piece:
    """One chunk to embed; `truncated` when it is the start of a text that was cut off;
    `span`, where the chunk's own characters lie in its document (what late chunking pools:
    see `document`)."""

    text: str
    truncated: bool = False
    span: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Counter:
    """How one model counts: `window` is what one input may hold, special tokens excluded;
    `tokenizer` a `tokenizers.Tokenizer` (a local model's), None for cl100k."""

    name: str  # names the tokenizer: equal names count alike
    window: int
    tokenizer: Any = field(default=None, compare=False)

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return count_tokens(text)
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def fits(self, text: str, capacity: int) -> bool:
        """Whether `text` is at most `capacity` tokens. A cl100k token holds at least one
        byte, so a text of no more bytes than that fits without being encoded: most rows
        of a short-text pipeline cost no tokenizer call."""
        if self.tokenizer is None and len(text) <= capacity and len(text.encode()) <= capacity:
            return True
        return self.count(text) <= capacity


@dataclass(frozen=True)
class Plan:
    """A pipeline's chunking settings, as pgembed.pipelines holds them."""

    strategy: str
    tokens: int
    overlap: int


def cl100k_counter(spec: ModelSpec, declared: str | None) -> Counter:
    """OpenAI's models count in cl100k exactly; a model that declared no tokenizer (an
    OpenAI-compatible server's) is counted in cl100k too, with a quarter of its window free
    for a tokenizer that cuts text finer."""
    window = spec.max_input_tokens if declared == "cl100k" else spec.max_input_tokens * 3 // 4
    return Counter("cl100k", max(window, 1))


def counter_for(spec: ModelSpec, declared: str | None) -> Counter:
    """The counter of a pipeline's model. A local model's tokenizer comes from the model the
    worker has loaded already (sentence-transformers), so nothing is fetched."""
    if spec.provider == "local":
        from pgembed.providers.local import chunk_counter

        return chunk_counter(spec)
    return cl100k_counter(spec, declared)


@functools.lru_cache(maxsize=64)
def _splitter(strategy: str, counter: Counter, capacity: int, overlap: int) -> Any:
    """Built once per settings: building one parses the tokenizer's vocabulary."""
    kind = MarkdownSplitter if strategy == "markdown" else TextSplitter
    if counter.tokenizer is None:
        return kind.from_tiktoken_model(CL100K_MODEL, capacity, overlap)
    return kind.from_huggingface_tokenizer(counter.tokenizer, capacity, overlap)


def budget(plan: Plan, counter: Counter) -> tuple[int, int]:
    """The chunk size and overlap actually used: never above the model's window, the overlap
    shrunk in proportion when the size had to be."""
    capacity = max(1, min(plan.tokens, counter.window))
    overlap = plan.overlap if capacity == plan.tokens else plan.overlap * capacity // plan.tokens
    return capacity, min(overlap, capacity - 1)


def _split(plan: Plan, counter: Counter, text: str) -> list[Piece]:
    capacity, overlap = budget(plan, counter)
    if counter.fits(text, capacity):
        return [Piece(text, span=(0, len(text)))]
    if plan.strategy == "truncate":
        first = _splitter("recursive", counter, capacity, 0).chunk_indices(text)[:1]
        return [Piece(chunk, True, (at, at + len(chunk))) for at, chunk in first]
    # the splitter's offsets count characters, as str indices do
    return [Piece(chunk, span=(at, at + len(chunk)))
            for at, chunk in _splitter(plan.strategy, counter, capacity, overlap).chunk_indices(text)]


def _tokens(plan: Plan, counter: Counter, text: str) -> list[Piece]:
    return [Piece(text[s:e], span=(s, e)) for s, e in chunk_spans(text, plan.tokens, plan.overlap)]


def _whole(plan: Plan, counter: Counter, text: str) -> list[Piece]:
    return [Piece(text, span=(0, len(text)))]


_BY_STRATEGY: dict[str, Callable[[Plan, Counter, str], list[Piece]]] = {
    "recursive": _split, "markdown": _split, "truncate": _split, "tokens": _tokens, "none": _whole,
}


def split(plan: Plan, counter: Counter, text: str) -> list[Piece]:
    """The chunks of `text`; blank chunks are dropped (there is nothing in them to embed)."""
    if plan.strategy not in _BY_STRATEGY:
        raise ValueError(f"unknown chunking strategy {plan.strategy!r}: use one of {', '.join(STRATEGIES)}")
    return [piece for piece in _BY_STRATEGY[plan.strategy](plan, counter, text) if piece.text.strip()]


def document(plan: Plan, counter: Counter, content: str, prefixed: bool) -> tuple[str, list[Piece]]:
    """What the model reads of a row, and its chunks with their spans in it. With a chunk
    prefix (content = prefix U+001E text) each chunk of the text is embedded after the
    prefix and a newline, so every chunk of an abstract carries its title; the prefix takes
    at most half the window (its start, if it is longer), the chunks get the rest. Late
    chunking runs the model over the document, the prefix then read once at its head
    (context for the whole document), and pools each span, which covers the chunk's own
    text only, though the chunk stored is the prefixed one, as plain chunking stores."""
    if not prefixed:
        return content, split(plan, counter, content)
    prefix, _, text = content.partition(SEPARATOR)
    prefix = prefix.strip()
    if not prefix:
        return text, split(plan, counter, text)
    half = Plan("truncate", max(counter.window // 2, 1), 0)
    head = _split(half, counter, prefix)[0].text
    room = Counter(counter.name, max(counter.window - counter.count(head + "\n"), 1), counter.tokenizer)
    shift = len(head) + 1
    return f"{head}\n{text}", [Piece(f"{head}\n{p.text}", p.truncated, (p.span[0] + shift, p.span[1] + shift))
                               for p in split(plan, room, text)]
