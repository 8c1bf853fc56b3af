"""`pgembed ratelimit set|show|clear`: the per-key budget every worker shares
(sql/ratelimit.sql)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from pgembed import ratelimit
from pgembed.cli import tables
from pgembed.cli.common import DsnOption, EmbeddedOption, JsonOption, connect, friendly, out, print_json
from pgembed.providers import ProviderError

ratelimit_app = typer.Typer(no_args_is_help=True, help="Set and show the API rate limit that all workers share.")

BucketOption = Annotated[str | None, typer.Option(
    help="The budget's bucket, as `pgembed ratelimit show` lists it; default: the bucket of "
         "PGEMBED_OPENAI_API_KEY and PGEMBED_OPENAI_BASE_URL in this environment, as a worker "
         "here would use them (the key itself never reaches the database).")]


def _bucket(bucket: str | None) -> tuple[str, str | None, str | None]:
    """(bucket, base URL, key fingerprint): the one named, else the environment's key's."""
    if bucket:
        return bucket, None, None
    try:
        key, url = ratelimit.openai_endpoint()
    except ProviderError as error:
        raise ValueError(f"{error} as the workers have it, or name the budget with --bucket") from None
    return ratelimit.bucket_name(url, key), url, ratelimit.key_fingerprint(key)


@ratelimit_app.command("set")
@friendly
def set_budget(
    requests_per_minute: Annotated[int | None, typer.Option(
        min=1, help="Requests per minute, summed over every worker and search.")] = None,
    tokens_per_minute: Annotated[int | None, typer.Option(
        min=1, help="Tokens per minute, summed over every worker and search.")] = None,
    burst_seconds: Annotated[float, typer.Option(
        min=0.001, max=60, help="How many seconds' worth of the budget may be sent at once.")] = 1.0,
    headroom: Annotated[float, typer.Option(
        min=0.01, max=1,
        help="Share of the budget spent: 0.9 throttles at 90 %, a margin for what the API "
             "counts differently.")] = ratelimit.DEFAULT_HEADROOM,
    bucket: BucketOption = None,
    dsn: DsnOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Limit what one API key is sent per minute, by all workers on all hosts together.

    Example: pgembed ratelimit set --requests-per-minute 3000 --tokens-per-minute 1000000 --headroom 0.9
    """
    if requests_per_minute is None and tokens_per_minute is None:
        raise ValueError("give --requests-per-minute, --tokens-per-minute or both "
                         "(`pgembed ratelimit clear` removes a budget)")
    budget = ratelimit.Budget.per_minute(requests_per_minute, tokens_per_minute, burst_seconds, headroom)
    name, base_url, fingerprint = _bucket(bucket)
    with connect(dsn, embedded) as conn:
        ratelimit.set_budget(conn, name, budget, base_url=base_url, key_fingerprint=fingerprint)
    out.print(f"budget of {escape(name)}: {tables.limit(requests_per_minute)} requests and "
              f"{tables.limit(tokens_per_minute)} tokens per minute, spent up to {headroom:.0%}; "
              f"running workers apply it within "
              f"{ratelimit.UNLIMITED_RECHECK:g} seconds", highlight=False)


@ratelimit_app.command("show")
@friendly
def show(as_json: JsonOption = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Every budget, what is being spent of it, and what the API's headers said of its
    limits (pgembed.rate_limit_status).

    Example: pgembed ratelimit show
    """
    with connect(dsn, embedded) as conn:
        rows = ratelimit.status(conn)
    if as_json:
        print_json({"budgets": rows})
        return
    if not rows:
        out.print("no budgets: no API key is rate limited; set one with "
                  "pgembed ratelimit set --requests-per-minute N --tokens-per-minute N")
    for row in rows:
        out.print(tables.budget(row))


@ratelimit_app.command("clear")
@friendly
def clear(bucket: BucketOption = None, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Remove a budget: that API key is no longer limited (workers see it at once).

    Example: pgembed ratelimit clear --bucket 'key:3f2a9c1b7d4e5f60@https://api.openai.com/v1'
    """
    name, _, _ = _bucket(bucket)
    with connect(dsn, embedded) as conn:
        removed = ratelimit.clear_budget(conn, name)
    if not removed:
        raise ValueError(f"no budget for {name}; `pgembed ratelimit show` lists them")
    out.print(f"budget of {escape(name)} removed: no longer rate limited", highlight=False)
