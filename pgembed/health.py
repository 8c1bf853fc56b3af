"""What makes a pipeline unhealthy, for `pgembed status --check`: one sentence per problem,
so that a monitoring check can page on a non-zero exit and show why."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from decimal import Decimal
from typing import Any


def problems(rows: Iterable[dict[str, Any]], stuck_after: dt.timedelta) -> list[str]:
    """Parked failures, gaps the latest audit found, and a queue whose oldest row has waited
    longer than `stuck_after` (no worker, or one that cannot keep up)."""
    found = []
    for row in rows:
        name = row["pipeline"]
        if row["failed"]:
            kinds = ", ".join(f"{kind} {n}" for kind, n in (row.get("failed_by_class") or {}).items())
            found.append(f"{name}: {row['failed']} rows failed and are parked ({kinds}; pgembed failures)")
        gaps = {kind: row[kind] for kind in ("missing", "orphaned", "stale") if row[kind]}
        if gaps:
            listed = ", ".join(f"{n} {kind}" for kind, n in gaps.items())
            found.append(f"{name}: the latest audit found {listed} (pgembed audit --repair)")
        waiting = row["queued"] + row["in_flight"] + row["retrying"]
        if waiting and row["oldest_gap"] is not None and row["oldest_gap"] > stuck_after:
            found.append(f"{name}: {waiting} rows queued, the oldest for {row['oldest_gap']} "
                         "(is a worker running?)")
    return found


def as_json(value: Any) -> Any:
    """JSON for the rows of pgembed's views: times as ISO 8601, intervals as seconds,
    numeric sums (the cost views') as numbers."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)
