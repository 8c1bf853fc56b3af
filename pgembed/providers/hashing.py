"""`hash:N` — deterministic, offline, lexical vectors for tests and trials.

Each token of the text is hashed into one of N buckets with a sign (the "hashing trick"),
and the result is L2-normalised: texts sharing words are close, so search results make
sense, but nothing here understands meaning.

It is also the provider the write-path benchmark drives, so it must cost next to nothing
next to the database work: words repeat, so each word's bucket is remembered, and the
vector is summed and normalised by numpy rather than element by element.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np

from pgembed.providers.base import EmbedResult, ModelSpec

_WORD = re.compile(r"\w+", re.UNICODE)


def _slot(word: str, dimensions: int) -> tuple[int, float]:
    digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little") % dimensions, 1.0 if digest[4] & 1 else -1.0


@lru_cache(maxsize=64)
def _codes(dimensions: int) -> dict[str, int]:
    """word -> 2 × bucket + (1 if the sign is negative): one dict look-up a word, the
    cheapest thing Python does per word (each text has dozens)."""
    return {}


def _code(word: str, dimensions: int) -> int:
    bucket, sign = _slot(word, dimensions)
    code = 2 * bucket + (sign < 0)
    codes = _codes(dimensions)
    if len(codes) < 1 << 16:
        codes[word] = code
    return code


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_count(text: str) -> int:
    """What the hash provider bills a text: its words (a dry run counts the same way)."""
    return len(_words(text))


def hash_arrays(words: list[list[str]], dimensions: int) -> np.ndarray:
    """The vectors of texts given by their words, one row each (float64), in one numpy
    pass over the whole batch: per-text numpy calls cost more than the arithmetic. An
    empty text gets the first unit vector."""
    get = _codes(dimensions).get
    codes = np.array([c if (c := get(w)) is not None else _code(w, dimensions) for ws in words for w in ws],
                     dtype=np.int64)
    rows = np.repeat(np.arange(len(words), dtype=np.int64), [len(ws) for ws in words])
    matrix = np.bincount(rows * dimensions + (codes >> 1), weights=1.0 - 2.0 * (codes & 1),
                         minlength=len(words) * dimensions).reshape(len(words), dimensions)
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    empty = norms == 0
    matrix[empty, 0], norms[empty] = 1.0, 1.0
    return matrix / norms[:, None]


def hash_array(text: str, dimensions: int) -> np.ndarray:
    """The vector of one text (float64)."""
    return hash_arrays([_words(text)], dimensions)[0]


def hash_vector(text: str, dimensions: int) -> list[float]:
    return hash_array(text, dimensions).tolist()


class HashProvider:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    async def embed(self, texts: list[str]) -> EmbedResult:
        words = [_words(t) for t in texts]
        vectors: list[list[float] | np.ndarray | None] = list(hash_arrays(words, self.spec.dimensions))
        tokens = [len(w) for w in words]
        return EmbedResult(
            vectors=vectors,
            errors=[None] * len(texts),
            tokens=sum(tokens),
            requests=1 if texts else 0,
            inputs_sent=len(texts),
            token_counts=tokens,
        )

    async def aclose(self) -> None:
        return None
