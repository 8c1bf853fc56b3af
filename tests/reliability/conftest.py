"""Fixtures of the reliability suite: a recording fake API, a fleet of worker processes,
and the figures each scenario reports, written to tests/reliability/results.json.

Every scenario runs twice over: `small` (unmarked: part of every `pytest -q`) and `full`
(marked `reliability`: `pytest -m reliability`). Without any `-m` on the command line the
full variants are deselected here, so the default run stays fast.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.reliability.convergence import Report
from tests.reliability.harness import Fleet, RecordingAPI, api_env, connect

RESULTS = Path(__file__).with_name("results.json")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("markexpr"):
        return
    full = [item for item in items if item.get_closest_marker("reliability")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [item for item in items if not item.get_closest_marker("reliability")]


class Results:
    """Rows of the README's Reliability table, one per scenario run."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, scenario: str, form: str, *, load: str, faults: str, inputs: str,
            report: Report | None = None, seconds: float | None = None, **extra: Any) -> None:
        row: dict[str, Any] = {
            "scenario": scenario, "form": form, "load": load, "faults": faults, "inputs": inputs,
            "rows_lost": report.lost + report.orphans + report.wrong_vectors if report else 0,
            "duplicates": report.duplicates if report else 0,
            "converge_s": round(seconds if seconds is not None else report.seconds if report else 0.0, 2),
        }
        if report is not None:
            row.update(rows=report.rows, chunks=report.chunks, failures=report.expected_failures,
                       api_inputs=report.api_inputs, api_ideal=report.api_ideal,
                       api_bound=report.api_bound)
        row.update(extra)
        row["at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.rows.append(row)

    def write(self) -> None:
        if not self.rows:
            return
        try:
            previous = json.loads(RESULTS.read_text())
        except (OSError, ValueError):
            previous = {}
        for row in self.rows:
            form = previous.setdefault(row["form"], {})
            form[row["scenario"]] = row
        RESULTS.write_text(json.dumps(previous, indent=2, sort_keys=True, ensure_ascii=False,
                                          default=float) + "\n")


@pytest.fixture(scope="session")
def results() -> Iterator[Results]:
    collected = Results()
    yield collected
    collected.write()


@pytest.fixture
def api() -> Iterator[RecordingAPI]:
    with RecordingAPI() as server:
        yield server


@pytest.fixture
def fleet(dsn: str, api: RecordingAPI, tmp_path: Path) -> Iterator[Fleet]:
    workers = Fleet(dsn, api_env(api), tmp_path)
    yield workers
    workers.stop_all()


@pytest.fixture
def db(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database, vectors registered."""
    conn = connect(dsn)
    yield conn
    conn.close()
