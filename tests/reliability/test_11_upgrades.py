"""11. Upgrades: SIGTERM with batches in flight; `pgembed init` while a worker runs; a newer
migration applied, rolled back and applied again under a running worker and a write load;
a worker refusing a schema newer than it knows."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic import command

from pgembed import migrate
from tests.reliability.convergence import converge
from tests.reliability.harness import (
    FORMS,
    ROOT,
    WriteLoad,
    api_pipeline,
    body_expect,
    make_docs,
    outbox_count,
    scalar,
    wait_for,
)

NEWER = '''"""A later revision, made up by the reliability test.

Revision ID: 0099
Revises: {head}
"""

from alembic import op


revision = "0099"
down_revision = "{head}"
branch_labels = None
depends_on = None


def _execute(sql: str) -> None:
    raw = op.get_bind().connection.dbapi_connection
    with raw.cursor() as cur:
        cur.execute(sql)


def upgrade() -> None:
    _execute("ALTER TABLE pgembed.outbox ADD COLUMN note text")
    _execute("CREATE INDEX outbox_note ON pgembed.outbox (note) WHERE note IS NOT NULL")
    # the definitions (functions, views) are re-applied after it, as after every upgrade


def downgrade() -> None:
    _execute("ALTER TABLE pgembed.outbox DROP COLUMN note")
'''


def newer_config(dsn: str, tmp: Path):
    scripts = tmp / "migrations"
    shutil.copytree(Path(migrate.alembic_config(dsn).get_main_option("script_location")), scripts,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "0099_newer.py").write_text(NEWER.format(head=migrate.head_revision()))
    config = migrate.alembic_config(dsn)
    config.set_main_option("script_location", str(scripts))
    return config


@pytest.mark.parametrize("form", FORMS)
def test_sigterm_init_and_migrations_under_a_running_worker(form, dsn, db, api, fleet, tmp_path, results):
    rows = form.pick(300, 5_000)
    make_docs(db, "docs", rows)
    name = api_pipeline(db, "docs")
    started = time.monotonic()

    # SIGTERM with batches in flight
    api.latency(1.0)
    first = fleet.start(batch_size=16, concurrency=2, lease=120)
    wait_for(lambda: api.in_flight >= 2, 30, "two batches in flight")
    sent = list(api.received)  # what the worker had asked the API for when the signal came
    first.signal(signal.SIGTERM)
    code = first.wait(60)
    held = scalar(db, "SELECT count(*) FROM pgembed.outbox WHERE leased_by = %s AND available_at > now()",
                  (first.name,))
    # graceful: the batches in flight were finished and acknowledged, not given back
    in_flight_ids = sorted({int(text.split()[1]) for text in sent})
    finished = scalar(db, f"SELECT count(DISTINCT id) FROM pgembed.{name} WHERE id = ANY(%s)",
                      (in_flight_ids,))
    api.latency(0.01)

    # init again, and a newer migration up, down and up, while a worker runs and rows change
    fleet.start(batch_size=16, concurrency=2, lease=120)
    load = WriteLoad(dsn, "docs", rows + 1, form.pick(200, 3_000), pause=0.005).start()
    init = subprocess.run([sys.executable, "-m", "pgembed", "init", "--dsn", dsn], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    config = newer_config(dsn, tmp_path)
    for step in range(form.pick(1, 3)):
        command.upgrade(config, "head")
        assert scalar(db, "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'pgembed' "
                          "AND table_name = 'outbox' AND column_name = 'note'") == 1
        time.sleep(0.5)
        command.downgrade(config, migrate.head_revision())
        time.sleep(0.5)
        if step == 0:
            command.upgrade(config, "head")
            command.downgrade(config, migrate.head_revision())
    load.join()
    last_fault = time.monotonic()
    report = converge(db, [body_expect(name, "docs")], api=api, timeout=120,
                      bound=lambda ideal: ideal + load.ops + 4 * 16)
    assert all(w.alive() for w in fleet.procs[1:]), fleet.logs()[-3000:]
    assert scalar(db, "SELECT version_num FROM public.pgembed_alembic_version") == migrate.head_revision()
    results.add("11 upgrades", form.name,
                load=f"{rows} rows, {load.ops} concurrent writes",
                faults=f"SIGTERM with 2 batches in flight (exit {code}, {held} rows left leased), "
                       f"pgembed init, newer migration up/down {form.pick(2, 4)}×",
                inputs="distinct text per row", report=report, seconds=time.monotonic() - last_fault,
                sigterm_exit=code, total_s=round(time.monotonic() - started, 1))
    assert code == 0, f"the worker exited {code} on SIGTERM: {first.text()[-3000:]}"
    assert "Traceback" not in first.text(), first.text()[-3000:]
    assert held == 0, f"SIGTERM left {held} rows leased"
    assert len(in_flight_ids) >= 2 * 16 and finished == len(in_flight_ids), (
        f"of the {len(in_flight_ids)} rows in flight at SIGTERM only {finished} were written: "
        f"{first.text()[-3000:]}")


def test_a_worker_refuses_a_schema_newer_than_it_knows(dsn, db, api, fleet):
    make_docs(db, "docs", 5)
    api_pipeline(db, "docs")
    db.execute("UPDATE public.pgembed_alembic_version SET version_num = '9999'")
    worker = fleet.start(until_empty=True, extra=["--no-scheduler"])
    code = worker.wait(60)
    text = worker.text()
    assert code != 0, text[-2000:]
    assert "revision 9999, newer than this pgembed knows" in " ".join(text.split()), text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    assert scalar(db, "SELECT count(*) FROM pgembed.outbox WHERE lease_id IS NOT NULL") == 0, "it claimed rows"
    assert outbox_count(db) == 5
