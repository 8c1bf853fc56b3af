"""A DSN that cannot work: the worker fails at once and in one sentence, as `pgembed status`
does (no half a minute of pool warnings), and no message, log line or traceback of either
ever shows the DSN's password, whatever shape the DSN has."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pgembed import db

SECRET = "S3cretPw"
MALFORMED = [
    f"postgresql://u:{SECRET}@[::1/postgres",                      # unbalanced bracket
    f"postgresql://u:{SECRET}@[::1]:notaport/postgres",           # bad port
    f"postgres://u:{SECRET}@/db?host=/nonexistent&sslmode=bogus",  # bad option value
    f"postgresql://u:{SECRET}@/db?host=/nonexistent&nosuchoption=1",
    f"postgresql://u:{SECRET[:4]}%{ord(SECRET[4]):02X}{SECRET[5:]}@[::1/x",  # percent-encoded
    f"postgresql:///db?host=/nonexistent&password={SECRET}&bogus",
    f"host=/nonexistent password='{SECRET} dbname=x",             # unterminated quote
    f"host=/nonexistent password={SECRET} dbname",                # missing "="
    f"host=/nonexistent password={SECRET} dbname=x",              # parses; nothing listens
    f"dbname=x password = '{SECRET}' host=/nonexistent nosuch=1",
]


def run(*args: str, timeout: float = 60) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGEMBED_")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pgembed", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


@pytest.mark.parametrize("dsn", MALFORMED)
def test_no_output_ever_shows_the_password(dsn):
    for command in (["status"], ["worker", "--until-empty", "--log-level", "debug"]):
        code, output, _ = run(*command, "--dsn", dsn)
        assert code == 1, (command, output)
        assert SECRET not in output and SECRET[-3:] not in output, (command, output)
        assert "error:" in output and "Traceback" not in output, (command, output)


def test_a_worker_with_a_wrong_dsn_fails_as_fast_and_as_clearly_as_status(tmp_path):
    dsn = f"host={tmp_path} port=1 dbname=x connect_timeout=2"
    status_code, status_output, _ = run("status", "--dsn", dsn)
    code, output, took = run("worker", "--dsn", dsn)
    assert code == status_code == 1
    assert took < 15, "no pool retries for its whole timeout before saying anything"
    assert "cannot connect to PostgreSQL" in output and "pool" not in output, output
    assert output.strip().splitlines()[-1] == status_output.strip().splitlines()[-1]


def test_redact_finds_the_password_in_every_shape():
    for dsn in MALFORMED:
        db.remember_secrets(dsn)
        assert SECRET not in db.redact(f"could not parse {dsn!r}"), dsn
    assert db.redact("postgresql://app:hunter2@db/app") == "postgresql://app:***@db/app"
    assert db.redact("host=db password=hunter2 dbname=app") == "host=db password=*** dbname=app"
