"""Every table the command line prints, and how it writes a number, a time or a price in
them: one place, so the same value reads the same in every command.

Tables fit the terminal they are printed on (80 columns is the width to design for): a
table that cannot fit in full first leaves out its spare columns (and says which), then
falls back to one record per row, its identifiers on a line of their own. Identifiers and
times are never cut with an ellipsis, nor broken across lines while they fit: a reader
must be able to tell `articles_h384` from `articles_h384_2` and copy either."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text

from pgembed.costs import Grouping
from pgembed.evaluation.runs import EvalRun
from pgembed.scheduler import format_duration
from pgembed.search import Hit
from pgembed.writethrough import SyncResult

Row = dict[str, Any]

# What `pgembed audit --repair` does with each kind of gap.
REPAIRS = {"missing": "queued", "stale": "queued", "orphaned": "vectors deleted",
           "failed": "left for pgembed failures --retry"}
_SUMMED = ("requests", "inputs", "tokens", "cache_hits", "cache_misses", "usd")


@dataclass(frozen=True)
class Col:
    """A column of a table that fits its terminal. `whole`: an identifier or a time, kept on
    one line; `key`: the row's identity (whole, and the heading of its record when the
    table falls back to records); `spare`: may be left out when the terminal is narrow,
    the highest first."""

    header: str
    whole: bool = False
    key: bool = False
    spare: int = 0

    @property
    def unbroken(self) -> bool:
        return self.whole or self.key


def table(title: str | Text, columns: Sequence[str | Col], rows: Iterable[Sequence[Any]]) -> Table:
    """Every title and cell is printed as it is: rows, keys, error messages and queries are
    user or database text, which rich would otherwise read as markup (`[/]` raises, and
    `[link=...]` would put a hyperlink in the reader's terminal). A cell that is styled is a
    Text already. A cell too long for its column is folded onto the next line, never cut
    with an ellipsis; a `whole` column is as wide as its longest cell."""
    cols = [c if isinstance(c, Col) else Col(c) for c in columns]
    body = [[literal("" if v is None else v) for v in r] for r in rows]
    t = Table(title=literal(title), title_justify="left")
    for i, c in enumerate(cols):
        widest = max((_longest_line(r[i]) for r in body), default=0) if c.unbroken else None
        t.add_column(literal(c.header), overflow="fold", no_wrap=c.unbroken, min_width=widest)
    for r in body:
        t.add_row(*r)
    return t


def literal(value: Any) -> Text:
    """A value as rich prints it without reading markup in it."""
    return value if isinstance(value, Text) else Text(str(value))


def _longest_line(text: Text) -> int:
    return max((cell_len(line) for line in text.plain.split("\n")), default=0)


def _longest_word(text: Text) -> int:
    return max((cell_len(word) for word in text.plain.split()), default=0)


class Fitted:
    """A table that fits the width it is printed at (see the module's docstring): rich asks
    for it at render time, so it fits whichever console prints it."""

    def __init__(self, title: str | Text, columns: Sequence[Col], rows: Iterable[Sequence[Any]]) -> None:
        self.title = title
        self.columns = list(columns)
        self.rows = [["" if v is None else v for v in r] for r in rows]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        for shown in self._choices():
            if self._least_width(shown) <= width:
                yield self._table(shown)
                return
        yield from self._records(width)

    def _choices(self) -> Iterator[list[int]]:
        """The columns to show, all first, then without the spare ones, most spare first."""
        shown = list(range(len(self.columns)))
        yield shown
        for level in sorted({c.spare for c in self.columns if c.spare}, reverse=True):
            shown = [i for i in shown if self.columns[i].spare != level]
            yield shown

    def _least_width(self, shown: list[int]) -> int:
        """The narrowest the table can be with whole cells whole and words unbroken: the
        widest unbreakable piece of each column, its padding (2) and borders (1 each, and 1)."""
        least = 1
        for i in shown:
            col = self.columns[i]
            cells = [literal(col.header), *(literal(r[i]) for r in self.rows)]
            measure = _longest_line if col.unbroken else _longest_word
            least += max(measure(c) for c in cells) + 3
        return least

    def _table(self, shown: list[int]) -> Table:
        t = table(self.title, [self.columns[i] for i in shown], ([r[i] for i in shown] for r in self.rows))
        left_out = [self.columns[i].header for i in range(len(self.columns)) if i not in shown]
        if left_out:
            t.caption = f"not shown at this width: {', '.join(left_out)}"
            t.caption_justify = "left"
        return t

    def _records(self, width: int) -> Iterator[Text]:
        """One record per row: its key cells on a line (labelled when there are several),
        then `header: value` pairs packed into lines of the width (a pair wider than that is
        folded)."""
        yield Text(literal(self.title).plain, style="italic")
        keys = [i for i, c in enumerate(self.columns) if c.key]
        for r in self.rows:
            heading = self._pairs(r, keys) if len(keys) > 1 else self._pairs(r, keys, labelled=False)
            for line in _packed(heading, width):
                yield Text(line, style="bold", overflow="fold")
            rest = [i for i in range(len(self.columns)) if i not in keys]
            for line in _packed(self._pairs(r, rest), width - 2):
                yield Text("  " + line, overflow="fold")

    def _pairs(self, row: Sequence[Any], shown: list[int], labelled: bool = True) -> list[str]:
        """`header: value` for each shown cell that has a value, on one line."""
        cells = [(self.columns[i].header, literal(row[i]).plain.replace("\n", " ")) for i in shown]
        return [f"{header}: {value}" if labelled else value for header, value in cells if value]


def _packed(items: list[str], width: int) -> list[str]:
    """Items joined by " · " into lines no wider than `width` where each fits."""
    lines: list[str] = []
    for item in items:
        if lines and cell_len(lines[-1]) + 3 + cell_len(item) <= width:
            lines[-1] += " · " + item
        else:
            lines.append(item)
    return lines


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

def pipelines(rows: list[Row]) -> Fitted:
    columns = [Col("name", key=True), Col("source", whole=True), Col("content"), Col("model", whole=True),
               Col("dimensions", spare=1), Col("index", whole=True), Col("queued")]
    return Fitted("pipelines", columns, ([r["name"], r["source"], r["content"], r["model"], r["dimensions"],
                                          index_text(r), r["queued"]] for r in rows))


def index_text(row: Row) -> str:
    """The index and how it holds the vectors: `hnsw`, `hnsw halfvec`, `hnsw binary`."""
    parts = [row["index_type"]]
    if row["storage"] != "vector":
        parts.append(row["storage"])
    if row["quantization"] != "none":
        parts.append(row["quantization"])
    return " ".join(parts)


def hits(pipeline: str, text: str, found: list[Hit]) -> Fitted:
    return Fitted(f"{pipeline}: {text}", [Col("key", whole=True), Col("distance"), Col("chunk")],
                  ((key_text(h.key), f"{h.distance:.4f}", h.chunk[:100]) for h in found))


def key_text(key: Row) -> str:
    return ", ".join(f"{k}={v}" for k, v in key.items())


# --- status and audit -----------------------------------------------------------------------

def pipeline_status(rows: list[Row]) -> Group:
    """pgembed.pipeline_status as three narrow tables, each with the full pipeline name, so
    that each fits an 80-column terminal; the model is the first to go (a default name says
    it, and `pgembed pipeline list` shows it)."""
    name = Col("pipeline", key=True)
    return Group(
        Fitted("pipelines", [name, Col("model", whole=True, spare=1), Col("source rows"), Col("embedded"),
                             Col("last embedded", whole=True)],
               ([r["pipeline"], r["model"], count(r["source_rows"]), count(r["embedded_rows"]),
                 when(r["last_embedded_at"])] for r in rows)),
        Fitted("queue", [name, Col("queued"), Col("in flight"), Col("retrying"), Col("failed"),
                         Col("oldest", whole=True)],
               ([r["pipeline"], count(r["queued"]), count(r["in_flight"]), count(r["retrying"]),
                 gap_count(r["failed"]), age(r["oldest_gap"])] for r in rows)),
        # missing, orphaned and stale are counted by audits (pgembed audit, the scheduler)
        Fitted("gaps, as the latest audit found them", [name, Col("missing"), Col("orphaned"), Col("stale"),
                                                       Col("audited", whole=True)],
               ([r["pipeline"], gap_count(r["missing"]), gap_count(r["orphaned"]), gap_count(r["stale"]),
                 r["gaps_checked_at"].strftime("%m-%d %H:%M") if r["gaps_checked_at"] else "never"]
                for r in rows)),
    )


def audit_gaps(run: Row, kinds: Sequence[str], repair: bool) -> Fitted:
    columns = [Col("kind", key=True), Col("rows")] + ([Col("repair")] if repair else [])
    return Fitted("gaps", columns,
                  ([kind, gap_count(run[kind])] + ([REPAIRS[kind]] if repair else []) for kind in kinds))


# --- costs ---------------------------------------------------------------------------------

def spend(rows: list[Row], days: int, by: Grouping) -> Fitted:
    """One row per group and a total, as pgembed.cost_daily / cost_by_cost_center /
    cost_by_attribution add up (with --top, the total of the rows shown).
    At 80 columns the counts a reader can do without (inputs, cache hits, then requests,
    then the model) are left out first; tokens, hit rate and usd stay."""
    keys = by.keys
    sums = {c: sum(r[c] or 0 for r in rows) for c in _SUMMED}
    named = {"cost_center", "label"}  # a NULL there is "nobody said"
    body = [[*(r[k] if r[k] is not None or k not in named else "(none)" for k in keys), *_spent(r)]
            for r in rows]
    body.append(["total", *[""] * (len(keys) - 1), *_spent(sums)])
    key_columns = [Col(by.value if k == "label" else k.replace("_", " "), whole=True, key=k != "model",
                       spare=4 if k == "model" else 0) for k in keys]
    return Fitted(f"spend, last {days} day{'s' if days > 1 else ''}, by {by.value}",
                  [*key_columns, Col("requests", spare=2), Col("inputs", spare=3), Col("tokens"),
                   Col("cache hits", spare=3), Col("hit rate"), Col("usd", whole=True)], body)


def share(rows: list[Row], days: int) -> Fitted:
    """pgembed.cost_share_daily: per day, indexing and queries and the share of each."""
    return Fitted(f"indexing vs queries, last {days} day{'s' if days > 1 else ''}",
                  [Col("day", whole=True, key=True), Col("work", key=True), Col("requests", spare=1),
                   Col("tokens"), Col("token share"), Col("usd", whole=True), Col("usd share")],
                  ([str(r["day"]), r["work"], count(r["requests"]), count(r["tokens"]), percent(r["token_share"]),
                    usd(r["usd"]), percent(r["usd_share"])] for r in rows))


def percent(value: float | Decimal | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _spent(r: Row) -> list[str]:
    return [count(r["requests"]), count(r["inputs"]), count(r["tokens"]), count(r["cache_hits"]),
            rate(r["cache_hits"], r["cache_misses"]), usd(r["usd"])]


def anomalies(rows: list[Row], keys: tuple[str, str] = ("pipeline", "purpose")) -> Fitted:
    """pgembed.cost_anomalies (by pipeline and purpose) or cost_source_anomalies (`keys`
    source and task)."""
    return Fitted(Text(f"spend by {keys[0]} far above the 7-day daily average today", style="red"),
                  [Col(keys[0], key=True), Col(keys[1], key=True), Col("measure"), Col("today"),
                   Col("daily avg (7d)"), Col("ratio")],
                  ([a[keys[0]], a[keys[1]], a["measure"],
                    *(usd(v) if a["measure"] == "usd" else count(v) for v in (a["today"], a["daily_avg_7d"])),
                    a["ratio"] or "new"] for a in rows))


def cache(rows: list[Row]) -> Fitted:
    return Fitted("cache", [Col("model", key=True), Col("entries"), Col("hits"), Col("hit rate"),
                            Col("tokens saved"), Col("usd saved", whole=True)],
                  ([c["model"], count(c["entries"]), count(c["cache_hits"]),
                    rate(c["cache_hits"], c["cache_misses"]), count(c["tokens_saved"]), usd(c["usd_saved"])]
                   for c in rows))


# --- rate limits ----------------------------------------------------------------------------

def budget(r: Row) -> Table:
    """One small table per bucket: a bucket's name alone is half a terminal wide. "API
    says" is what the provider's headers said of its own limit, and what remains of it now
    by that count (blank: nothing learnt, or its reset has come)."""
    rows = []
    for kind, short in (("requests", "requests"), ("tokens", "tokens")):
        said = r[f"api_{kind}_limit"], r[f"api_{kind}_remaining"]
        api = "" if said[1] is None else f"{count(said[1])} of {limit(said[0]) if said[0] else '?'}"
        rows.append([short, limit(r[f"max_{kind}"]), count(r[f"window_{kind}"]), count(r[f"granted_{kind}"]), api])
    t = table(r["bucket"], [f"per {r['per_seconds']:g}s", "budget", "in window now", "granted in all",
                            "API says left"], rows)
    t.caption = (f"spent up to {r['headroom']:.0%}; waited {count(r['waits'])} times; "
                 f"last grant {when(r['last_grant_at']) or 'never'}; "
                 f"API headers last seen {when(r['api_seen_at']) or 'never'}")
    t.caption_justify = "left"
    return t


# --- aliases and evaluation -----------------------------------------------------------------

def score(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def change(value: float | None) -> str | Text:
    if value is None:
        return ""
    return Text(f"{value:+.4f}", style="red" if value < 0 else "green" if value > 0 else "")


def aliases(rows: list[Row]) -> Fitted:
    return Fitted("aliases", [Col("name", key=True), Col("pipeline", whole=True), Col("previous", spare=2),
                              Col("eval set", spare=1), Col("every", spare=1), Col("changed", whole=True, spare=3)],
                  ([r["name"], r["pipeline"], r["previous"], r["eval_set"],
                    format_duration(r["eval_every"].total_seconds()) if r["eval_every"] else "never",
                    when(r["changed_at"])] for r in rows))


def eval_sets(rows: list[Row]) -> Fitted:
    return Fitted("evaluation sets", [Col("name", key=True), Col("source", whole=True), Col("origin", spare=1),
                                      Col("queries"), Col("relevant"), Col("irrelevant", spare=2),
                                      Col("imported", whole=True, spare=3)],
                  ([r["name"], r["source"], r["origin"], count(r["queries"]), count(r["relevant"]),
                    count(r["irrelevant"]), when(r["imported_at"])] for r in rows))


def eval_metrics(run: EvalRun) -> Fitted:
    """One run's Recall, P and MRR, a row per cut-off k (nDCG@10 is said above it)."""
    ks = sorted(int(name.split("@")[1]) for name in run.metrics if name.startswith("recall@"))
    return Fitted("by cut-off", [Col("k", key=True), Col("Recall@k"), Col("P@k"), Col("MRR@k")],
                  ([k, score(run.metrics[f"recall@{k}"]), score(run.metrics[f"p@{k}"]), score(run.metrics[f"mrr@{k}"])]
                   for k in ks))


def eval_history(rows: list[Row]) -> Fitted:
    return Fitted("evaluation runs", [Col("at", whole=True), Col("target", key=True), Col("pipeline", whole=True),
                                      Col("set", whole=True, spare=2), Col("nDCG@10"), Col("change"),
                                      Col("queries", spare=1)],
                  ([when(r["at"]), r["target"], r["pipeline"], r["eval_set"], score(r["ndcg_10"]),
                    change(r["ndcg_10_change"]), count(r["queries"])] for r in rows))


def eval_regressions(rows: list[Row]) -> Fitted:
    return Fitted("regressions", [Col("at", whole=True), Col("target", key=True), Col("pipeline", whole=True,
                                                                                    spare=1),
                                  Col("set", whole=True, spare=2), Col("nDCG@10"), Col("before"), Col("change")],
                  ([when(r["at"]), r["target"], r["pipeline"], r["eval_set"], score(r["ndcg_10"]),
                    score(r["previous_ndcg_10"]), change(r["ndcg_10_change"])] for r in rows))


# --- model migrations -----------------------------------------------------------------------

def estimate(title: str, e: Any) -> Fitted:
    """A dry run (pgembed.estimate.Estimate), one line of figures."""
    seconds = "no rate budget" if e.seconds is None else age(timedelta(seconds=e.seconds))
    return Fitted(title, [Col("rows"), Col("chunks"), Col("cached", spare=1), Col("tokens"), Col("usd"),
                          Col("time", whole=True)],
                  [(count(e.rows), count(e.chunks), count(e.cached_chunks), count(e.tokens), usd(e.usd), seconds)])


def migrations(rows: list[Row]) -> Fitted:
    """Progress and spend so far against the dry run's estimate (spent/estimated)."""
    columns = [Col("id", whole=True), Col("alias", key=True), Col("phase", whole=True), Col("to_pipeline", whole=True),
               Col("done"), Col("eta", whole=True, spare=1), Col("tokens"), Col("usd", spare=2),
               Col("rollback_until", whole=True, spare=3)]
    return Fitted("migrations", columns, (
        (r["id"], r["alias"], r["phase"], r["to_pipeline"], f"{count(r['done'])}/{count(r['rows'])}",
         age(r["eta"]), f"{count(r['tokens'])}/{count(r['estimated_tokens'])}",
         f"{usd(r['usd'])}/{usd(r['estimated_usd'])}", when(r["rollback_until"]))
        for r in rows))


def metrics_compared(title: str, active: dict[str, float], shadow: dict[str, float]) -> Fitted:
    return Fitted(title, [Col("metric", key=True), Col("active"), Col("shadow"), Col("points")], (
        (k, f"{active[k]:.4f}", f"{shadow.get(k, 0.0):.4f}", f"{(shadow.get(k, 0.0) - active[k]) * 100:+.1f}")
        for k in sorted(active)))


def gate_failures(failed: list[Row]) -> Fitted:
    return Fitted("metrics below the gate", [Col("metric", key=True), Col("active"), Col("shadow"), Col("points")],
                  ((f["metric"], f"{f['active']:.4f}", f"{f['shadow']:.4f}", f"-{f['points']}") for f in failed))


# --- write-through --------------------------------------------------------------------------

def sync_outcomes(result: SyncResult) -> Fitted:
    """`pgembed sync-now`: one line a key, what became of it (and why, for a failure)."""
    return Fitted(f"{result.pipeline}: {len(result.keys)} keys in {result.seconds:.2f}s",
                  [Col("key", key=True), Col("status", whole=True), Col("detail")],
                  ((", ".join(k.key), k.status, k.error or (f"held by {k.holder}" if k.holder else ""))
                   for k in result.keys))
