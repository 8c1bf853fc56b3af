"""pgembed keeps pgvector embeddings of ordinary PostgreSQL rows correct, cheap and fresh."""

from pgembed.aio import AsyncClient
from pgembed.client import Client

__all__ = ["AsyncClient", "Client"]
__version__ = "0.1.0"
