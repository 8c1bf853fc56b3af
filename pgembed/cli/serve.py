"""`pgembed serve`: the embedding gateway (pgembed/gateway/), under uvicorn.

Every option has a PGEMBED_GATEWAY_* variable; the bearer tokens are a variable only
(PGEMBED_GATEWAY_TOKENS), so that they never appear in `ps`."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated, Any

import typer

from pgembed import db, logs, migrate
from pgembed.cli.common import EXIT_USAGE, DsnOption, JsonOption, configured_target, fail, friendly, out, print_json
from pgembed.gateway.settings import TOKENS_VARIABLE, GatewaySettings, SettingsError, parse_tokens

DEFAULTS = GatewaySettings(no_auth=True)

# longer than clients keep an idle connection (httpx, so the OpenAI SDKs: 5 s): at uvicorn's
# default of 5 s both may close it at once, and a request the client sends on it as the
# server closes it fails with a read error (the client's APIConnectionError)
_KEEP_ALIVE_SECONDS = 75


def _option(name: str, help_text: str, *names: str, **limits: Any) -> Any:
    return typer.Option(*names, envvar=f"PGEMBED_GATEWAY_{name}", show_envvar=True, help=help_text, **limits)


@friendly
def serve(
    host: Annotated[str, _option("HOST", "Address to listen on (0.0.0.0: every interface).")] = DEFAULTS.host,
    port: Annotated[int, _option("PORT", "Port to listen on.", min=1, max=65535)] = DEFAULTS.port,
    window_ms: Annotated[float, _option(
        "WINDOW_MS", "How long a request waits for others to share its upstream call (0 to 20 ms).")
    ] = DEFAULTS.window_ms,
    max_batch: Annotated[int, _option(
        "MAX_BATCH", "Texts per upstream call at most (the model's own limits apply too).", min=1)
    ] = DEFAULTS.max_batch,
    max_body_bytes: Annotated[int, _option("MAX_BODY_BYTES", "Largest request body accepted (413 beyond).")
    ] = DEFAULTS.max_body_bytes,
    concurrency: Annotated[int, _option("CONCURRENCY", "Upstream requests in flight at once.", min=1)
    ] = DEFAULTS.concurrency,
    pool_size: Annotated[int, _option("POOL_SIZE", "PostgreSQL connections at most.", min=1)] = DEFAULTS.pool_size,
    no_auth: Annotated[bool, _option(
        "NO_AUTH", f"Serve without bearer tokens (a loopback --host only); else {TOKENS_VARIABLE} is required.",
        "--no-auth")] = False,
    log_format: Annotated[str, _option("LOG_FORMAT", "human or json.")] = "human",
    log_level: Annotated[str, _option("LOG_LEVEL", "debug, info, warning or error.")] = "info",
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    embedded: Annotated[bool, typer.Option("--embedded", help="Use the embedded PostgreSQL.")] = False,
) -> None:
    """Serve POST /v1/embeddings (OpenAI-compatible) and /v1/search, batched, cached and
    recorded in pgembed.usage; GET /healthz and /metrics. Runs until SIGTERM/SIGINT.

    Example: PGEMBED_GATEWAY_TOKENS=secret pgembed serve --host 0.0.0.0 --port 8080
    """
    try:
        settings = GatewaySettings(host=host, port=port, window_ms=window_ms, max_batch=max_batch,
                                   max_body_bytes=max_body_bytes, concurrency=concurrency, pool_size=pool_size,
                                   tokens=parse_tokens(os.environ.get(TOKENS_VARIABLE)), no_auth=no_auth)
    except SettingsError as error:
        fail(error, EXIT_USAGE)
    target = configured_target(dsn, embedded, "serve")
    with db.connect(target, "gateway") as conn:
        migrate.check_revision(migrate.current_revision(conn))
    logs.setup(log_format, log_level, stream=sys.stderr)
    import uvicorn

    from pgembed.gateway.app import create_app

    url = f"http://{host}:{port}"
    if as_json:
        print_json({"listening": url, "window_ms": settings.window_ms, "max_batch": settings.max_batch,
                    "auth": not settings.no_auth, "tokens": len(settings.tokens)})
    else:
        out.print(f"pgembed gateway on {url} (window {settings.window_ms:g} ms, "
                  f"{'no auth' if settings.no_auth else f'{len(settings.tokens)} token(s)'})", highlight=False)
    sys.stdout.flush()
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again, which
    # Python's default action turns into death by signal: after a clean stop, exit 0
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: None)
    uvicorn.run(create_app(target, settings), host=host, port=port, log_level=log_level, access_log=False,
                lifespan="on", timeout_graceful_shutdown=10, timeout_keep_alive=_KEEP_ALIVE_SECONDS)
