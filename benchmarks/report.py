"""The table (Markdown, ready for the README) and the JSON report."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.harness import Result


def number(value: float | None, unit: str | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}" if unit else text


def cells(r: Result) -> list[str]:
    if r.status != "ok":
        figure = f"{r.status}: {r.note}" if r.note else r.status
        return [r.name, figure, "", "", r.target, ""]
    limit = number(r.limit, r.limit_unit if r.limit_unit is not None else r.unit)
    if r.limit_label and r.limit is not None:
        limit = f"{limit} ({r.limit_label})"
    met = "–" if r.met is None else ("yes" if r.met else "**no**")
    ratio = "–" if r.ratio is None else f"{r.ratio:.2f}"
    return [r.name, number(r.figure, r.unit), limit, ratio, r.target, met]


HEADER = ["scenario", "figure", "limit (same run)", "ratio", "target", "met?"]


def table(results: list[Result]) -> str:
    rows = [HEADER, *(cells(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    out = [line(rows[0]), "| " + " | ".join("-" * w for w in widths) + " |"]
    out.extend(line(r) for r in rows[1:])
    return "\n".join(out)


def notes(results: list[Result]) -> str:
    lines = [f"- {r.name}: {r.note}" for r in results if r.status == "ok" and r.note]
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, *, results: list[Result], facts: dict[str, Any], scale: Any,
               seconds: float, scenario_seconds: dict[str, float]) -> None:
    report = {
        "pgembed_benchmarks": 1,
        "scale": dataclasses.asdict(scale),
        "seconds": round(seconds, 1),
        "scenario_seconds": {k: round(v, 1) for k, v in scenario_seconds.items()},
        "machine": facts,
        "results": [dict(dataclasses.asdict(r), name=r.name) for r in results],
        "table": table(results),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report), indent=2, default=str) + "\n", encoding="utf-8")
