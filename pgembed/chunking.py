"""Split text into overlapping windows of cl100k tokens.

Windows are cut in tokens, not characters, because the limits they must respect (the
model's input limit, the batch token budget, the bill) are counted in tokens. Consecutive
windows share `overlap` tokens so that a sentence cut at a window edge still appears whole
in one of them.

cl100k is a byte-level BPE: one emoji or CJK character can span several tokens, and a token
can end in the middle of a character. Decoding such a window would put U+FFFD into the
stored chunk and into its embedding. So a window edge that falls inside a character moves
back to the nearest token edge that is also a character edge (and a window start moves
forward), which makes a window at most `max_tokens` tokens and an overlap at most `overlap`
tokens; both are exact for text whose token edges are all character edges (e.g. ASCII).
Only when `max_tokens` is smaller than the tokens of a single character (at most 4) does a
window grow past it, to the next character edge, rather than emit broken text.

The result depends only on the text and the two numbers: re-chunking unchanged text gives
the same chunks, so their content hashes hit the embedding cache.
"""

from __future__ import annotations

import bisect
import itertools

from pgembed.tokens import encode, token_bytes

Window = tuple[int, int]  # [start, end) token indices


def _validate(max_tokens: int, overlap: int) -> None:
    """Refuse settings that would loop forever or silently mean something else."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0 (0 means no chunking), got {max_tokens}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if max_tokens == 0 and overlap > 0:
        raise ValueError(f"overlap ({overlap}) needs chunking: set max_tokens > 0 or overlap to 0")
    if max_tokens > 0 and overlap >= max_tokens:
        raise ValueError(
            f"overlap ({overlap}) must be smaller than max_tokens ({max_tokens}), or no window would move forward"
        )


def _character_edges(offsets: list[int], data: bytes) -> list[int]:
    """Token indices where a character starts, plus the end of the text."""
    return [i for i, at in enumerate(offsets) if at == len(data) or data[at] & 0xC0 != 0x80]


def _window_end(edges: list[int], start: int, max_tokens: int) -> int:
    """The furthest character edge within max_tokens of `start`, or the next one after it."""
    inside = bisect.bisect_right(edges, start + max_tokens) - 1
    if edges[inside] > start:
        return edges[inside]
    return edges[bisect.bisect_right(edges, start)]


def _next_start(edges: list[int], start: int, end: int, overlap: int) -> int:
    """The first character edge at or after end - overlap that still moves forward."""
    return edges[bisect.bisect_left(edges, max(end - overlap, start + 1))]


def _windows(edges: list[int], max_tokens: int, overlap: int) -> list[Window]:
    """Walk the token list from edge to edge; `edges[-1]` is the token count."""
    total = edges[-1]
    if max_tokens == 0:
        return [(0, total)]
    windows: list[Window] = []
    start = 0
    while True:
        end = _window_end(edges, start, max_tokens)
        windows.append((start, end))
        if end == total:
            return windows
        start = _next_start(edges, start, end, overlap)


def _split(text: str, max_tokens: int, overlap: int) -> tuple[list[Window], list[int], bytes]:
    """Token windows of `text`, each token's byte offset, and the text's UTF-8 bytes."""
    _validate(max_tokens, overlap)
    pieces = token_bytes(encode(text))
    if not pieces:
        return [], [0], b""
    offsets = [0, *itertools.accumulate(len(p) for p in pieces)]
    data = b"".join(pieces)
    return _windows(_character_edges(offsets, data), max_tokens, overlap), offsets, data


def token_windows(text: str, max_tokens: int, overlap: int) -> list[Window]:
    """The [start, end) token ranges over `encode(text)` that `chunk_text` decodes.

    Exposed so that callers (and tests) can see exactly which tokens each chunk holds and
    how many it shares with its neighbour.
    """
    return _split(text, max_tokens, overlap)[0]


def chunk_spans(text: str, max_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """The [start, end) character ranges of `chunk_text`'s chunks in `text` (late chunking
    pools the model's states of exactly those characters)."""
    if max_tokens == 0:
        _validate(max_tokens, overlap)
        return [(0, len(text))] if text.strip() else []
    windows, offsets, data = _split(text, max_tokens, overlap)
    # window edges fall between characters: each edge's byte offset has a character offset
    chars = {at: len(data[:at].decode("utf-8")) for w in windows for at in (offsets[w[0]], offsets[w[1]])}
    spans = [(chars[offsets[s]], chars[offsets[e]]) for s, e in windows]
    return [(s, e) for s, e in spans if text[s:e].strip()]


def chunk_text(text: str, max_tokens: int, overlap: int) -> list[str]:
    """Overlapping chunks of at most `max_tokens` cl100k tokens; `max_tokens=0`: one chunk.

    Text with nothing but whitespace gives no chunks, and a whitespace-only window inside
    a longer text is dropped: there is nothing in it to embed, and an embedding API would
    reject it. The caller decides what an empty result means (for a row: "empty text").
    """
    return [text[s:e] for s, e in chunk_spans(text, max_tokens, overlap)]
