"""A month in production, compressed: one partitioned table with two pipelines goes through
the schema changes a team makes (a content column renamed, a column added, a key column
widened, the table renamed and moved to another schema, a partition attached and one
detached) while an application role writes to it all the time. The application sees no
error, and after a drain the convergence check holds for both pipelines."""

from __future__ import annotations

import random
import threading
import uuid

import psycopg
from psycopg.conninfo import make_conninfo

from tests.conftest import drain
from tests.reliability.convergence import Expect, converge

STEPS = [
    "ALTER TABLE prod RENAME COLUMN body TO text_body",
    "ALTER TABLE prod ADD COLUMN note text",
    "ALTER TABLE prod ALTER COLUMN id TYPE bigint",
    "ALTER TABLE prod RENAME TO products",
    "CREATE SCHEMA shop",
    "ALTER TABLE products SET SCHEMA shop",
    "CREATE TABLE prod_asia (LIKE shop.products)",
    "INSERT INTO prod_asia SELECT 'asia', g, 'asia ' || g, 'body ' || g FROM generate_series(1, 50) g",
    "ALTER TABLE shop.products ATTACH PARTITION prod_asia FOR VALUES IN ('asia')",
    "ALTER TABLE shop.products DETACH PARTITION prod_us",
]


def _application(dsn: str, stop: threading.Event, errors: list[str], writes: list[int]) -> None:
    """Writes to the partition it owns, by names no step changes: what a live service does."""
    rng = random.Random(7)
    with psycopg.connect(dsn, autocommit=True) as app:
        next_id = 1000
        while not stop.is_set():
            try:
                kind = rng.choice(("insert", "update", "delete"))
                if kind == "insert":
                    app.execute("INSERT INTO prod_eu (region, id, title) VALUES ('eu', %s, %s)",
                                (next_id, f"new {next_id}"))
                    next_id += 1
                elif kind == "update":
                    app.execute("UPDATE prod_eu SET title = title || '+' WHERE id = %s", (rng.randrange(1, next_id),))
                else:
                    app.execute("DELETE FROM prod_eu WHERE id = %s", (rng.randrange(1, next_id),))
                writes[0] += 1
            except psycopg.Error as error:
                errors.append(f"{kind}: {error}")


def test_schema_changes_under_a_writing_application(conn, dsn):
    app_role = f"app_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {app_role} LOGIN")
    conn.execute("CREATE TABLE prod (region text, id int, title text, body text, PRIMARY KEY (region, id)) "
                 "PARTITION BY LIST (region)")
    for region in ("eu", "us"):
        conn.execute(f"CREATE TABLE prod_{region} PARTITION OF prod FOR VALUES IN ('{region}')")
        conn.execute(f"INSERT INTO prod SELECT '{region}', g, '{region} ' || g, 'body ' || g "
                     "FROM generate_series(1, 200) g")
    conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON prod_eu TO {app_role}")
    conn.execute("SELECT pgembed.create_pipeline('prod', $$title || ' / ' || coalesce(body, '')$$, 'hash:8', "
                 "name => 'full')")
    conn.execute("SELECT pgembed.create_pipeline('prod', 'upper(title)', 'hash:16', name => 'titles')")
    drain(dsn)

    stop, errors, writes = threading.Event(), [], [0]
    app = threading.Thread(target=_application, args=(make_conninfo(dsn, user=app_role), stop, errors, writes))
    app.start()
    try:
        for step in STEPS:
            before = writes[0]
            conn.execute(step)
            while writes[0] < before + 20 and app.is_alive():  # the application writes between steps
                stop.wait(0.01)
    finally:
        stop.set()
        app.join(30)
    assert errors == [], errors[:5]
    assert writes[0] > 20 * len(STEPS)
    drain(dsn)
    table = "shop.products"
    converge(conn, [
        Expect("full", table, ["region", "id"], ["title", "text_body"], lambda t, b: f"{t} / {b or ''}"),
        Expect("titles", table, ["region", "id"], ["title"], lambda t: t.upper()),
    ], timeout=10)
    assert conn.execute("SELECT count(*) FROM pgembed.gaps()").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pgembed.full WHERE region = 'us'").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pgembed.full WHERE region = 'asia'").fetchone() == (50,)
    conn.execute(f"DROP OWNED BY {app_role}")
    conn.execute(f"DROP ROLE {app_role}")
