"""Prints the README's Reliability table from results.json:

    python -m tests.reliability.table [full|small]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("results.json")
COLUMNS = ("scenario", "load", "faults", "inputs", "rows_lost", "duplicates", "converge_s")
HEAD = ("scenario", "load", "faults injected", "inputs tried", "rows lost", "duplicates", "time to converge (s)")


def table(form: str = "full") -> str:
    rows = json.loads(RESULTS.read_text()).get(form, {})
    lines = ["| " + " | ".join(HEAD) + " |", "|" + " --- |" * len(HEAD)]
    for name in sorted(rows, key=lambda n: (int("".join(c for c in n.split()[0] if c.isdigit()) or 0), n)):
        row = rows[name]
        cells = [str(row.get(c, "")).replace("|", "\\|") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "full"))
