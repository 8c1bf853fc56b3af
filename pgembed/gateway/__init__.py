"""`pgembed serve`: the embedding gateway, an OpenAI-compatible HTTP front on
`pgembed.aio.AsyncClient` (cache, adaptive batching, shared rate limit, usage ledger)."""
