"""15. The embedding gateway under load (issue 15, acceptance 1): `gateway_clients`
concurrent clients (200), each its own `openai.AsyncOpenAI`, sending single-text queries,
against the fake API (a subprocess, `gateway_latency` = 100 ms a request) directly and
through `pgembed serve` (a subprocess, its default 10 ms window).

Three passes, all in this run:

* closed loop: every client sends its next query as soon as the last is answered. Upstream
  requests / client requests through the gateway is the batching (target ≤ 1/10). On a
  shared 2-core machine 200 SDK clients in one process are CPU-bound (some 5 ms of client
  CPU a request), so this pass's latencies measure the client's queue, not the gateway:
  they are in the details only.
* paced: the same clients with a think time (uniform in 0..`gateway_think_s`) before each
  query, each alternating one query to the fake API directly and one through the gateway, so
  that both are measured under the same load. The latency the gateway adds, p50 and p99, is
  a gateway request's latency minus a direct one's at the same percentile; the figure is the
  gateway's p50 against the direct p50 + window + 5 ms (target: ≤ 1). Each client then asks
  its last gateway query again: a cache hit, whose latency (details: `hit_p50_s`, and
  `hit_vs_direct_p50`) is answered without waiting for a window.
* cache: the closed loop's texts again: the share answered without an upstream input
  (target: all, 0 upstream requests).

CPU seconds of the fake API, the gateway and the client process over the closed loop and
the load average are in the details (the machine is shared).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import urllib.request
from typing import Any

import openai
import psutil

from benchmarks.harness import Bench, Result, at_most, percentile, ratio, spawn, stop

NAME = "gateway"
MODEL = "text-embedding-3-small"
TOKEN = "bench-gateway-token"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(root: str, child: Any, seconds: float = 60) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the gateway exited: {child.tail()}")
        try:
            with urllib.request.urlopen(f"{root}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway did not become healthy: {child.tail()}")


async def _load(base_url: str, key: str, clients: int, requests: int, dims: int, tag: str) -> list[float]:
    """Every client's requests, one after another; the latency of each, in seconds."""
    latencies: list[float] = []

    async def client(number: int) -> None:
        async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60) as sdk:
            for i in range(requests):
                latencies.append(await _timed(sdk, f"{tag} query {number}-{i} about tides", dims))

    await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies


async def _paced(api_url: str, gateway_url: str, clients: int, requests: int, dims: int,
                 think: float) -> tuple[list[float], list[float], list[float]]:
    """Each client alternates a query to the API and one through the gateway, then the
    gateway's again (a cache hit), a seeded think time before each: all measured under the
    same load, the machine's included."""
    direct: list[float] = []
    through: list[float] = []
    hits: list[float] = []

    async def client(number: int) -> None:
        pauses = random.Random(number)
        async with openai.AsyncOpenAI(base_url=api_url, api_key="sk-direct", max_retries=0, timeout=60) as api, \
                openai.AsyncOpenAI(base_url=gateway_url, api_key=TOKEN, max_retries=0, timeout=60) as gateway:
            for i in range(requests):
                for sdk, into in ((api, direct), (gateway, through)) if (number + i) % 2 else \
                        ((gateway, through), (api, direct)):
                    await asyncio.sleep(pauses.uniform(0, think))
                    into.append(await _timed(sdk, f"paced query {number}-{i} about tides", dims))
                await asyncio.sleep(pauses.uniform(0, think))
                hits.append(await _timed(gateway, f"paced query {number}-{i} about tides", dims))

    await asyncio.gather(*(client(n) for n in range(clients)))
    return direct, through, hits


async def _timed(sdk: openai.AsyncOpenAI, text: str, dims: int) -> float:
    started = time.perf_counter()
    answer = await sdk.embeddings.create(model=MODEL, input=text, dimensions=dims)
    elapsed = time.perf_counter() - started
    assert len(answer.data[0].embedding) == dims
    return elapsed


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def run(bench: Bench) -> list[Result]:
    s = bench.scale
    clients, requests, dims = s.gateway_clients, s.gateway_requests, s.gateway_dims
    api = bench.fake_api(s.gateway_latency)
    port = _free_port()
    root = f"http://127.0.0.1:{port}"
    with bench.database() as dsn:
        gateway = spawn(bench, "gateway", ["-m", "pgembed", "serve", "--dsn", dsn, "--port", str(port),
                                           "--window-ms", str(s.gateway_window_ms)],
                        env={**api.env(), "PGEMBED_GATEWAY_TOKENS": TOKEN, "PGEMBED_OPENAI_CONCURRENCY": "64"})
        try:
            _wait_healthy(root, gateway)
            bench.log(f"  {NAME}: {clients} clients × {requests} requests closed-loop, again (cache), "
                      f"then × {s.gateway_paced_requests} paced, direct and through the gateway")
            asyncio.run(_load(f"{root}/v1", TOKEN, 2, 2, dims, "warm-up"))  # tokenizer, provider, pool
            api.reset(s.gateway_latency)
            me, load_before = psutil.Process(), os.getloadavg()
            cpu_before = (api.cpu(), _cpu(gateway.pid), _cpu(me.pid))
            closed = asyncio.run(_load(f"{root}/v1", TOKEN, clients, requests, dims, "closed"))
            cpu_after = (api.cpu(), _cpu(gateway.pid), _cpu(me.pid))
            missed = api.stats()
            asyncio.run(_load(f"{root}/v1", TOKEN, clients, requests, dims, "closed"))
            hit = api.stats()
            direct, through, hits = asyncio.run(_paced(api.base_url, f"{root}/v1", clients, s.gateway_paced_requests,
                                                 dims, s.gateway_think_s))
        finally:
            stop(gateway, 30)
    sent = clients * requests
    window = s.gateway_window_ms / 1000
    added = {p: percentile(through, p) - percentile(direct, p) for p in (50, 99)}
    bound = percentile(direct, 50) + window + 0.005
    answered = 1 - (hit["inputs"] - missed["inputs"]) / sent
    upstream = ratio(missed["requests"], sent)
    details = {
        "clients": clients, "requests_per_client": requests, "dimensions": dims, "window_ms": s.gateway_window_ms,
        "fake_api_latency_s": s.gateway_latency, "client_requests": sent,
        "upstream_requests": missed["requests"], "upstream_inputs": missed["inputs"],
        "direct_p50_s": percentile(direct, 50), "direct_p99_s": percentile(direct, 99),
        "gateway_p50_s": percentile(through, 50), "gateway_p99_s": percentile(through, 99),
        "hit_p50_s": percentile(hits, 50), "hit_p99_s": percentile(hits, 99),
        "hit_vs_direct_p50": ratio(percentile(hits, 50), percentile(direct, 50)),
        "paced_requests_per_client": s.gateway_paced_requests, "think_s": s.gateway_think_s,
        "closed_loop_p50_s": percentile(closed, 50), "closed_loop_p99_s": percentile(closed, 99),
        "added_p50_ms": added[50] * 1000, "added_p99_ms": added[99] * 1000,
        "cache_pass_upstream_requests": hit["requests"] - missed["requests"],
        "closed_loop_fake_api_cpu_s": round(cpu_after[0] - cpu_before[0], 3),
        "closed_loop_gateway_cpu_s": round(cpu_after[1] - cpu_before[1], 3),
        "closed_loop_client_cpu_s": round(cpu_after[2] - cpu_before[2], 3),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    return [
        Result(NAME, f"upstream/client requests, {clients} clients", upstream, "×", 0.1, "×", "1/10",
               ratio(upstream, 0.1), "≤ 1/10", at_most(upstream, 0.1), details=details),
        # as a ratio to the same run's baseline: the direct p50 plus what the gateway may add
        Result(NAME, "p50 latency vs direct + window + 5 ms", percentile(through, 50) * 1000, "ms",
               bound * 1000, "ms", "direct p50 + window + 5 ms", ratio(percentile(through, 50), bound),
               "≤ 1 (added ≤ window + 5 ms)", at_most(percentile(through, 50), bound),
               note=f"paced pass; added p50 {added[50] * 1000:.1f} ms, p99 {added[99] * 1000:.1f} ms",
               details=details),
        Result(NAME, "cache pass answered without upstream", answered, "of requests", 1.0, "of requests",
               "all", ratio(answered, 1.0), "all (0 upstream requests)", hit["requests"] == missed["requests"],
               details=details),
    ]
