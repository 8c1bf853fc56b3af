"""Retrieval quality: IR metrics and a BEIR-format evaluation of a pipeline against exact
search with the same model (benchmarks' `quality` scenario, and its small form in tests)."""
