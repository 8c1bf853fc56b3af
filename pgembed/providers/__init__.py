"""Embedding providers, chosen by the `provider:` prefix of a model name."""

from __future__ import annotations

from pgembed.providers.base import (
    EmbedResult,
    ModelSpec,
    Provider,
    ProviderError,
    UnknownModelError,
)

__all__ = [
    "EmbedResult",
    "ModelSpec",
    "Provider",
    "ProviderError",
    "UnknownModelError",
    "make_provider",
]


def make_provider(spec: ModelSpec) -> Provider:
    """Build the provider for a model; heavy imports happen only for the one asked for."""
    if spec.provider == "hash":
        from pgembed.providers.hashing import HashProvider

        return HashProvider(spec)
    if spec.provider == "openai":
        from pgembed.providers.openai import OpenAIProvider

        return OpenAIProvider(spec)
    if spec.provider == "local":
        from pgembed.providers.local import LocalProvider

        return LocalProvider(spec)
    raise UnknownModelError(
        f"unknown provider {spec.provider!r} in model {spec.model!r}: "
        "use openai:NAME, local:NAME or hash:N"
    )
