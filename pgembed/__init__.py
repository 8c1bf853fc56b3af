"""pgembed keeps pgvector embeddings of ordinary PostgreSQL rows correct, cheap and fresh."""

from pgembed.client import Client

__all__ = ["Client"]
__version__ = "0.1.0"
