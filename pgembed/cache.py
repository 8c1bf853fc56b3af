"""Cache keys. An embedding is an immutable artifact of (model, dimensions, text), so its
key is a hash of all three: the same text is never paid for twice, whatever row, table or
pipeline it comes from, and a new model or size can never hit an old entry. A late-chunked
chunk's vector is an artifact of its whole document and its place in it, so its key is a
hash of those, marked so that it is never a plain chunk's key."""

from __future__ import annotations

import hashlib


def chunk_key(model: str, dimensions: int, text: str) -> bytes:
    return hashlib.sha256(f"{model}\x1f{dimensions}\x1f{text}".encode()).digest()


def late_chunk_key(model: str, dimensions: int, document: str, span: tuple[int, int]) -> bytes:
    """U+001E after the dimensions where a plain key has U+001F: whatever a plain chunk's
    text is, the two kinds never share a key."""
    start, end = span
    return hashlib.sha256(f"{model}\x1f{dimensions}\x1elate\x1f{start}:{end}\x1f{document}".encode()).digest()


def document_hash(text: str) -> bytes:
    """sha256 of the content's UTF-8 bytes: the SQL views recompute it as
    sha256(convert_to(content, 'UTF8')) to find stale vectors without the outbox."""
    return hashlib.sha256(text.encode()).digest()
