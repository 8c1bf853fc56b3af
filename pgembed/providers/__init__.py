"""Embedding providers, chosen by the `provider:` prefix of a model name."""

from __future__ import annotations

from pgembed.providers.base import (
    EmbedResult,
    ModelSpec,
    Provider,
    ProviderError,
    RateLimiter,
    UnknownModelError,
)

__all__ = [
    "EmbedResult",
    "ModelSpec",
    "Provider",
    "ProviderError",
    "RateLimiter",
    "UnknownModelError",
    "make_provider",
]


def make_provider(spec: ModelSpec, *, limiter: RateLimiter | None = None, concurrency: int | None = None) -> Provider:
    """Build the provider for a model; heavy imports happen only for the one asked for.

    `limiter` is the budget of the API key, asked before every HTTP request; providers that
    call no API (`hash:`, `local:`) have nothing to ask it for and ignore it. The caller
    builds it (the worker, from PostgreSQL), so that providers stay free of the database.
    `concurrency` bounds an API provider's requests in flight (None: its own setting).
    """
    if spec.provider == "hash":
        from pgembed.providers.hashing import HashProvider

        return HashProvider(spec)
    if spec.provider == "openai":
        from pgembed.providers.openai import OpenAIProvider

        return OpenAIProvider(spec, limiter=limiter, concurrency=concurrency)
    if spec.provider == "local":
        from pgembed.providers.local import LocalProvider

        return LocalProvider(spec)
    raise UnknownModelError(
        f"unknown provider {spec.provider!r} in model {spec.model!r}: "
        "use openai:NAME, local:NAME or hash:N"
    )
