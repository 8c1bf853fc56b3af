"""Cache keys. An embedding is an immutable artifact of (model, dimensions, text), so its
key is a hash of all three: the same text is never paid for twice, whatever row, table or
pipeline it comes from, and a new model or size can never hit an old entry."""

from __future__ import annotations

import hashlib


def chunk_key(model: str, dimensions: int, text: str) -> bytes:
    return hashlib.sha256(f"{model}\x1f{dimensions}\x1f{text}".encode()).digest()


def document_hash(text: str) -> bytes:
    """sha256 of the content's UTF-8 bytes: the SQL views recompute it as
    sha256(convert_to(content, 'UTF8')) to find stale vectors without the outbox."""
    return hashlib.sha256(text.encode()).digest()
