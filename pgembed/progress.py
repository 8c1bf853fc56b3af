"""Draining a backlog with visible progress: a rich bar (rate, ETA) on a terminal, plain
log lines otherwise, so that a cron job's log stays readable."""

from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pgembed import db
from pgembed.queue import AckResult
from pgembed.sqlfiles import query
from pgembed.worker import Worker, WorkerConfig, WorkerStats


def backlog(dsn: str) -> int:
    with db.connect(dsn) as conn:
        row = conn.execute(query("backlog")).fetchone()
    return int(row[0]) if row else 0


def drain(dsn: str, config: WorkerConfig, console: Console) -> WorkerStats:
    """Run a worker until the queue is empty, reporting rows done against the backlog."""
    total = backlog(dsn)
    started = time.monotonic()
    done = 0

    def rate() -> float:
        return done / max(time.monotonic() - started, 1e-6)

    if not console.is_terminal:
        def log_line(result: AckResult) -> None:
            nonlocal done
            done += result.written + result.removed + result.failed
            console.print(f"embedded {done}/{total} rows ({rate():.0f} rows/s)", highlight=False)

        return asyncio.run(Worker(dsn, config, on_batch=log_line).run())

    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("rows", total=total or None, rate="0")

        def advance(result: AckResult) -> None:
            nonlocal done
            step = result.written + result.removed + result.failed
            done += step
            bar.update(task, advance=step, rate=f"{rate():.0f}")

        return asyncio.run(Worker(dsn, config, on_batch=advance).run())
