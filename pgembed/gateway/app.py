"""The gateway's routes: an ASGI app on Starlette (routing and requests, nothing more: the
batching, cache and ledger are `pgembed.aio.AsyncClient`'s), served by uvicorn.

    POST /v1/embeddings   OpenAI's embeddings API (bearer token)
    POST /v1/search       nearest rows of an alias or a pipeline (bearer token)
    POST /v1/sync         write-through: named rows embedded and stored now (bearer token)
    GET  /healthz         database reachable and its schema at this pgembed's revision
    GET  /metrics         Prometheus

Every failure is an answer in OpenAI's error shape, never a crash: a bad request is a 4xx
that names the field, the provider being down a 503, anything unforeseen a 500 (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgembed import migrate
from pgembed.aio import AsyncClient, UnknownModel
from pgembed.attribution import Attribution, AttributionError, from_headers
from pgembed.batcher import EmbedError
from pgembed.gateway.auth import authorized
from pgembed.gateway.metrics import GatewayMetrics
from pgembed.gateway.settings import GatewaySettings
from pgembed.gateway.wire import (
    ApiError,
    embeddings_answer,
    embeddings_request,
    read_json,
    search_request,
    sync_request,
)
from pgembed.pipelines import PipelineError
from pgembed.tokens import count_all
from pgembed.writethrough import WriteThrough, WriteThroughError

log = logging.getLogger("pgembed.gateway")

Handler = Callable[[Request], Awaitable[Response]]
_RENDER_INLINE_FLOATS = 200_000


def pgembed_model(name: str) -> str:
    """The pgembed model an OpenAI `model` means: a bare name is OpenAI's
    (`text-embedding-3-small` -> `openai:text-embedding-3-small`); `local:`/`hash:`/`openai:`
    names are given in full."""
    return name if ":" in name else f"openai:{name}"


def create_app(dsn: str, settings: GatewaySettings) -> Starlette:
    client = AsyncClient(dsn, window=settings.window, max_batch=settings.max_batch,
                         concurrency=settings.concurrency, pool_size=settings.pool_size)
    metrics = GatewayMetrics(lambda: client.batcher.depth)
    client.batcher.observer = metrics
    writer = WriteThrough(client.pool)  # one for the server's life: it keeps its providers

    def route(name: str, handler: Handler, *, auth: bool = True) -> Handler:
        async def answer(request: Request) -> Response:
            try:
                if auth and not settings.no_auth and not authorized(request.headers, settings.tokens):
                    raise ApiError(401, "Incorrect or missing API key: send a gateway token as "
                                        "'Authorization: Bearer TOKEN'", code="invalid_api_key")
                response = await handler(request)
            except ApiError as error:
                response = JSONResponse(error.body(), status_code=error.status)
            except Exception:
                log.exception("gateway: %s failed", name)
                response = JSONResponse(ApiError(500, "the gateway failed on this request").body(), status_code=500)
            metrics.requests.labels(name, str(response.status_code)).inc()
            return response
        return answer

    async def embeddings(request: Request) -> Response:
        body = embeddings_request(await read_json(request, settings.max_body_bytes))
        attribution = _attribution(request, body.user)
        tokens = await count_all(body.texts)
        try:
            vectors = await client.embed(body.texts, pgembed_model(body.model), body.dimensions, attribution,
                                         tokens=tokens)
        except UnknownModel:
            raise ApiError(404, f"The model `{body.model}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found") from None
        except ValueError as error:
            raise ApiError(400, str(error), param="dimensions") from None
        except EmbedError as error:
            raise ApiError(error.status, error.message, param="input" if error.status < 500 else None) from None
        def render() -> bytes:
            answer = embeddings_answer(body.model, vectors, body.encoding_format, sum(tokens))
            return json.dumps(answer, separators=(",", ":")).encode()

        # a big answer (2,048 vectors of 3,072 floats) takes seconds to print: off the event loop
        big = sum(len(v) for v in vectors) > _RENDER_INLINE_FLOATS
        return Response(await asyncio.to_thread(render) if big else render(), media_type="application/json")

    async def search(request: Request) -> Response:
        body = search_request(await read_json(request, settings.max_body_bytes))
        attribution = _attribution(request, body.user)
        try:
            found = await client.search(body.target, body.text, body.k, body.filter,
                                        vector=None if body.vector is None else np.asarray(body.vector),
                                        attribution=attribution)
        except (PipelineError, ValueError) as error:
            raise ApiError(400, str(error)) from None
        except EmbedError as error:
            raise ApiError(error.status, error.message, param="query" if error.status < 500 else None) from None
        return JSONResponse({"object": "list", "data": [
            {"key": hit.key, "chunk": hit.chunk, "chunk_seq": hit.chunk_seq, "distance": hit.distance}
            for hit in found]})

    async def sync(request: Request) -> Response:
        """200 when every key is searchable as its row now is; 202 when some are not yet
        (failed, held or still queued): they stay queued and a worker converges them."""
        body = sync_request(await read_json(request, settings.max_body_bytes))
        try:
            result = await writer.sync(body.target, body.keys, timeout=body.timeout)
        except WriteThroughError as error:
            raise ApiError(400, str(error), param="keys") from None
        return JSONResponse(result.as_dict(), status_code=200 if result.ok else 202)

    async def healthz(request: Request) -> Response:
        try:
            async with client.pool.connection(timeout=5) as conn:
                found = await migrate.current_revision_async(conn)
            migrate.check_revision(found)
        except Exception as error:
            return JSONResponse({"status": "unavailable", "problem": str(error).splitlines()[0]}, status_code=503)
        return JSONResponse({"status": "ok", "revision": found})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await client.open()
        try:
            yield
        finally:
            await writer.aclose()
            await client.aclose()

    app = Starlette(routes=[
        Route("/v1/embeddings", route("embeddings", embeddings), methods=["POST"]),
        Route("/v1/search", route("search", search), methods=["POST"]),
        Route("/v1/sync", route("sync", sync), methods=["POST"]),
        Route("/healthz", route("healthz", healthz, auth=False), methods=["GET"]),
        Route("/metrics", route("metrics", prometheus, auth=False), methods=["GET"]),
    ], lifespan=lifespan, exception_handlers={404: _no_route, 405: _no_route})
    app.state.client = client
    app.state.metrics = metrics
    return app


async def _no_route(request: Request, error: Exception) -> Response:
    """An unknown path or a wrong method, answered in OpenAI's error shape (an SDK pointed
    at the gateway for an API it does not serve raises NotFoundError, not a parse error)."""
    status = getattr(error, "status_code", 404)
    what = "no such route" if status == 404 else "method not allowed on"
    served = ", ".join(path for route in request.app.routes if (path := getattr(route, "path", "")).startswith("/v1/"))
    message = f"{what}: {request.method} {request.url.path} (the gateway serves {served})"
    return JSONResponse(ApiError(status, message).body(), status_code=status,
                        headers=getattr(error, "headers", None))


def _attribution(request: Request, user: Any) -> Attribution:
    try:
        return from_headers(request.headers, user)
    except AttributionError as error:
        raise ApiError(400, str(error), param="user") from None
