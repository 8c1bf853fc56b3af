"""The benchmarks at tiny sizes, so that they never rot: every scenario must produce a
figure and the JSON report must be written. Speed is never asserted here (the machines
that run the tests are shared and noisy); `python -m benchmarks` measures it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import SCENARIOS

REPO = Path(__file__).resolve().parents[1]
# The scenarios in three runs, so that the suite's processes share them out: one run of all
# of them took most of its time limit on a loaded machine.
GROUPS = [SCENARIOS[i::3] for i in range(3)]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g[0])
def test_every_scenario_produces_a_figure_and_the_report_is_written(tmp_path, group):
    out = tmp_path / "report.json"
    env = dict(os.environ)
    if os.environ.get("PGEMBED_TEST_DSN"):
        env["PGEMBED_BENCH_DSN"] = os.environ["PGEMBED_TEST_DSN"]
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--scale", "small", "--out", str(out),
                           "--only", ",".join(group)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())

    results = report["results"]
    assert {r["scenario"] for r in results} == set(group)
    for r in results:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["scenario"] == "audit" and r["note"] == "view missing", r
            continue
        assert isinstance(r["figure"], int | float) and r["figure"] > 0, r
        assert isinstance(r["limit"], int | float) and r["limit"] > 0, r
        assert r["ratio"] is not None, r
    cases = {r["name"] for r in results}
    for dims in (1536, 768, 384):
        for index in ("none", "hnsw"):
            assert "write_path" not in group or f"write_path/{dims}d/{index}" in cases
    assert {"cpu_count", "memory_total_mb", "python", "postgres", "pgvector", "git_commit"} <= set(report["machine"])
    assert report["table"].startswith("| scenario")
    assert "| scenario" in done.stdout
