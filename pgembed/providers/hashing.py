"""`hash:N` — deterministic, offline, lexical vectors for tests and trials.

Each token of the text is hashed into one of N buckets with a sign (the "hashing trick"),
and the result is L2-normalised: texts sharing words are close, so search results make
sense, but nothing here understands meaning.
"""

from __future__ import annotations

import hashlib
import math
import re

from pgembed.providers.base import EmbedResult, ModelSpec

_WORD = re.compile(r"\w+", re.UNICODE)


def hash_vector(text: str, dimensions: int) -> list[float]:
    vector = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest[:4], "little") % dimensions
        vector[bucket] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0:
        vector[0] = 1.0
        return vector
    return [x / norm for x in vector]


class HashProvider:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    async def embed(self, texts: list[str]) -> EmbedResult:
        vectors: list[list[float] | None] = [hash_vector(t, self.spec.dimensions) for t in texts]
        tokens = [len(_WORD.findall(t)) for t in texts]
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
