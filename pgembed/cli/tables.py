"""Every table the command line prints, and how it writes a number, a time or a price in
them: one place, so the same value reads the same in every command."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from pgembed.costs import Grouping
from pgembed.search import Hit

Row = dict[str, Any]

# What `pgembed audit --repair` does with each kind of gap.
REPAIRS = {"missing": "queued", "stale": "queued", "orphaned": "vectors deleted",
           "failed": "left for pgembed failures --retry"}
_SUMMED = ("requests", "inputs", "tokens", "cache_hits", "cache_misses", "usd")


def table(title: str | Text, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """Every title and cell is printed as it is: rows, keys, error messages and queries are
    user or database text, which rich would otherwise read as markup (`[/]` raises, and
    `[link=...]` would put a hyperlink in the reader's terminal). A cell that is styled is a
    Text already."""
    t = Table(title=literal(title), title_justify="left")
    for c in columns:
        t.add_column(literal(c))
    for r in rows:
        t.add_row(*(literal("" if v is None else v) for v in r))
    return t


def literal(value: Any) -> Text:
    """A value as rich prints it without reading markup in it."""
    return value if isinstance(value, Text) else Text(str(value))


# --- cells ----------------------------------------------------------------------------------

def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def age(value: timedelta | None) -> str:
    """An interval as a person reads it: 42s, 3m 05s, 2h 10m, 4d 3h."""
    if value is None:
        return ""
    seconds = int(value.total_seconds())
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def count(value: float | Decimal | None) -> str:
    """Sums from the cost views arrive as numeric; a count is shown whole."""
    return "" if value is None else f"{round(value):,}"


def usd(value: float | Decimal | None) -> str:
    if value is None:
        return ""
    return "<0.000001" if 0 < value < 0.0000005 else f"{value:,.6f}"


def rate(hits: int, misses: int) -> str:
    return f"{hits / (hits + misses):.1%}" if hits + misses else ""


def gap_count(value: int | None) -> str | Text:
    if value is None:  # no audit of this pipeline yet
        return "–"
    return Text(f"{value:,}", style="red") if value else "0"


def limit(value: int | None) -> str:
    return "no limit" if value is None else f"{value:,}"


# --- pipelines and search -------------------------------------------------------------------

def pipelines(rows: list[Row]) -> Table:
    columns = ["name", "source", "content", "model", "dimensions", "index_type", "queued"]
    return table("pipelines", columns, ([r[c] for c in columns] for r in rows))


def hits(pipeline: str, text: str, found: list[Hit]) -> Table:
    return table(f"{pipeline}: {text}", ["key", "distance", "chunk"],
                 ((", ".join(f"{k}={v}" for k, v in h.key.items()), f"{h.distance:.4f}", h.chunk[:100])
                  for h in found))


# --- status and audit -----------------------------------------------------------------------

def pipeline_status(rows: list[Row]) -> Group:
    """pgembed.pipeline_status as three narrow tables, so each fits an 80-column terminal."""
    return Group(
        table("pipelines", ["pipeline", "model", "source rows", "embedded", "last embedded"],
              ([r["pipeline"], r["model"], count(r["source_rows"]), count(r["embedded_rows"]),
                when(r["last_embedded_at"])] for r in rows)),
        table("queue", ["pipeline", "queued", "in flight", "retrying"],
              ([r["pipeline"], count(r["queued"]), count(r["in_flight"]), count(r["retrying"])] for r in rows)),
        # missing, orphaned and stale are counted by audits (pgembed audit, the scheduler)
        table("gaps", ["pipeline", "failed", "missing", "orphaned", "stale", "oldest gap", "audited"],
              ([r["pipeline"], gap_count(r["failed"]), gap_count(r["missing"]),
                gap_count(r["orphaned"]), gap_count(r["stale"]), age(r["oldest_gap"]),
                r["gaps_checked_at"].strftime("%m-%d %H:%M") if r["gaps_checked_at"] else "never"]
               for r in rows)),
    )


def audit_gaps(run: Row, kinds: Sequence[str], repair: bool) -> Table:
    return table("gaps", ["kind", "rows"] + (["repair"] if repair else []),
                 ([kind, gap_count(run[kind])] + ([REPAIRS[kind]] if repair else []) for kind in kinds))


# --- costs and failures ---------------------------------------------------------------------

def spend(rows: list[Row], days: int, by: Grouping) -> Table:
    """One row per group and a total, as pgembed.cost_daily / cost_by_cost_center add up."""
    keys = ["pipeline", "model", "purpose"] if by is Grouping.purpose else ["cost_center", "pipeline", "purpose"]
    sums = {c: sum(r[c] or 0 for r in rows) for c in _SUMMED}
    body = [[*(r[k] if r[k] is not None or k != "cost_center" else "(none)" for k in keys), *_spent(r)]
            for r in rows]
    body.append(["total", "", "", *_spent(sums)])
    return table(f"spend, last {days} day{'s' if days > 1 else ''}, by {by.value}",
                 [k.replace("_", " ") for k in keys]
                 + ["requests", "inputs", "tokens", "cache hits", "hit rate", "usd"], body)


def _spent(r: Row) -> list[str]:
    return [count(r["requests"]), count(r["inputs"]), count(r["tokens"]), count(r["cache_hits"]),
            rate(r["cache_hits"], r["cache_misses"]), usd(r["usd"])]


def anomalies(rows: list[Row]) -> Table:
    return table(Text("spend far above the 7-day daily average today", style="red"),
                 ["pipeline", "purpose", "measure", "today", "daily avg (7d)", "ratio"],
                 ([a["pipeline"], a["purpose"], a["measure"],
                   *(usd(v) if a["measure"] == "usd" else count(v) for v in (a["today"], a["daily_avg_7d"])),
                   a["ratio"] or "new"] for a in rows))


def cache(rows: list[Row]) -> Table:
    return table("cache", ["model", "entries", "hits", "hit rate", "tokens saved", "usd saved"],
                 ([c["model"], count(c["entries"]), count(c["cache_hits"]),
                   rate(c["cache_hits"], c["cache_misses"]), count(c["tokens_saved"]), usd(c["usd_saved"])]
                  for c in rows))


def failures(rows: list[Row]) -> Table:
    return table("failures", ["pipeline", "key", "error", "attempts", "first failed", "last failed", "parked"],
                 ([r["pipeline"], ", ".join(str(k) for k in r["key"]), r["error"], r["attempts"],
                   when(r["first_failed_at"]), when(r["last_failed_at"]), when(r["parked_at"]) or "no, retrying"]
                  for r in rows))


# --- rate limits ----------------------------------------------------------------------------

def budget(r: Row) -> Table:
    """One small table per bucket: a bucket's name alone is half a terminal wide."""
    t = table(r["bucket"], [f"per {r['per_seconds']:g}s", "budget", "in window now", "granted in all"],
              [["requests", limit(r["max_requests"]), count(r["window_requests"]), count(r["granted_requests"])],
               ["tokens", limit(r["max_tokens"]), count(r["window_tokens"]), count(r["granted_tokens"])]])
    t.caption = f"waited {count(r['waits'])} times; last grant {when(r['last_grant_at']) or 'never'}"
    t.caption_justify = "left"
    return t
