"""9. The float path: a server that ignores `encoding_format=base64` and answers every vector
as a JSON list of numbers (several OpenAI-compatible servers do).

Two measurements, each against a baseline run in this process:

* decode: one 500 × 768 body read the old way (json.loads, a Python float per value, then
  numpy) and the way the provider reads it now (pgembed.providers.response.read_body);
* drain: the same rows through the real worker and `openai` client, answered in base64, in
  floats, and in floats with the old reader put back (the in-run baseline of the change),
  at the knobs of the pgai comparison (batch 500, concurrency 4, no latency). The fake API
  answers pre-serialised vectors, so its own CPU (reported) stays small.

Per drain: rows/s, and worker, PostgreSQL and fake-API CPU per row.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from benchmarks.api_bound import environment
from benchmarks.harness import (
    Bench,
    Result,
    at_least,
    connect,
    copy_docs,
    corpus,
    count,
    cpu_now,
    create_docs,
    create_pipeline,
    drain,
    ratio,
    vacuum,
    worker_config,
)
from pgembed.providers import openai as openai_provider
from pgembed.providers.response import read_body

NAME = "float_path"
MODEL = "openai:text-embedding-3-small"


def run(bench: Bench) -> list[Result]:
    return [_decode(), *_drains(bench)]


def _old_reader(raw: bytes) -> Any:
    return json.loads(raw)


def _best_of(repeats: int, step: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def _body(inputs: int, dims: int) -> bytes:
    rng = np.random.default_rng(1)
    data = [{"object": "embedding", "index": i, "embedding": rng.standard_normal(dims).astype(np.float32).tolist()}
            for i in range(inputs)]
    return json.dumps({"object": "list", "data": data, "usage": {"prompt_tokens": 1}}).encode()


def _decode() -> Result:
    raw = _body(500, 768)

    def old() -> object:
        return [np.asarray(item["embedding"], dtype=np.float32) for item in _old_reader(raw)["data"]]

    def new() -> object:
        return [np.asarray(item["embedding"], dtype=np.float32) for item in read_body(raw)["data"]]

    before, after = _best_of(5, old), _best_of(5, new)
    speedup = ratio(before, after)
    return Result(NAME, "decode 500×768", after * 1000, "ms", before * 1000, "ms", "json.loads + numpy",
                  speedup, "≥ 3× faster", at_least(speedup, 3.0),
                  details={"body_bytes": len(raw), "old_ms": round(before * 1000, 2),
                           "new_ms": round(after * 1000, 2)})


@contextlib.contextmanager
def _reader(reader: Callable[[bytes], Any]) -> Iterator[None]:
    saved = openai_provider.read_body
    openai_provider.read_body = reader  # type: ignore[assignment]
    try:
        yield
    finally:
        openai_provider.read_body = saved  # type: ignore[assignment]


def _drains(bench: Bench) -> list[Result]:
    cases = {"base64": (False, read_body), "floats": (True, read_body), "floats, old reader": (True, _old_reader)}
    measured = {case: _drain(bench, floats, reader) for case, (floats, reader) in cases.items()}
    base, old = measured["base64"]["rows_per_s"], measured["floats, old reader"]["rows_per_s"]
    results = []
    for case, m in measured.items():
        against, label = (old, "floats, old reader") if case == "floats" else (base, "base64")
        r = ratio(m["rows_per_s"], against)
        target, met = ("", None) if case != "floats" else ("≥ 1 × old reader", at_least(r, 1.0))
        results.append(Result(NAME, f"drain {case}", m["rows_per_s"], "rows/s", against, "rows/s", label, r,
                              target, met and m["stored"] == m["rows"], details=m))
    return results


def _drain(bench: Bench, floats: bool, reader: Callable[[bytes], Any]) -> dict[str, Any]:
    s = bench.scale
    api = bench.fake_api(0.0)
    config = worker_config(s, batch_size=s.float_batch_size, bulk_batch_size=s.float_batch_size,
                           concurrency=s.float_concurrency)
    with bench.database() as dsn, connect(dsn) as conn, environment(api.env()), _reader(reader):
        create_docs(conn)
        destination = create_pipeline(conn, MODEL, dimensions=s.float_dims, index="none")
        copy_docs(conn, corpus(s.float_rows))
        vacuum(conn, "pgembed.outbox")
        api.control(canned=True, floats_only=floats)
        before, api_before = cpu_now(bench), api.cpu()
        drained = drain(dsn, config)
        used, api_used = cpu_now(bench) - before, api.cpu() - api_before
        stored = count(conn, destination)
    rows = s.float_rows
    per_row = lambda seconds: None if seconds is None else round(seconds / rows * 1e6, 1)  # noqa: E731
    return {"rows": rows, "stored": stored, "rows_per_s": stored / drained.seconds,
            "worker_cpu_us_per_row": per_row(used.client), "server_cpu_us_per_row": per_row(used.server),
            "fake_api_cpu_us_per_row": per_row(api_used), **used.as_dict(drained.seconds)}
