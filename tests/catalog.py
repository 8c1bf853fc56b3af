"""A comparable picture of everything pgembed put in a database: what the catalog-diff tests
compare between a migrated database and one made straight from sql/.

Columns are compared by name, not position: ADD COLUMN appends, and nothing in pgembed
depends on the order. OIDs never appear; names, definitions and privileges do (no ACL means the default one).
"""

from __future__ import annotations

import psycopg

QUERIES = {
    "relations": """
        SELECT c.relname, c.relkind, c.relpersistence, coalesce(c.reloptions, '{}'),
               coalesce(c.relacl, acldefault('r', c.relowner))::text
          FROM pg_class c WHERE c.relnamespace = 'pgembed'::regnamespace
         ORDER BY 1""",
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attstorage, a.attidentity, a.attgenerated,
               coalesce(a.attacl::text, '')
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'pgembed'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY 1, 2""",
    "constraints": """
        SELECT c.relname, k.conname, pg_get_constraintdef(k.oid)
          FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
         WHERE c.relnamespace = 'pgembed'::regnamespace
         ORDER BY 1, 2""",
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'pgembed' ORDER BY 1""",
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid),
               coalesce(p.proacl, acldefault('f', p.proowner))::text,
               coalesce(obj_description(p.oid, 'pg_proc'), '')
          FROM pg_proc p WHERE p.pronamespace = 'pgembed'::regnamespace
         ORDER BY 1""",
    "views": """
        SELECT viewname, definition FROM pg_views WHERE schemaname = 'pgembed' ORDER BY 1""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid)
          FROM pg_trigger t WHERE NOT t.tgisinternal ORDER BY 1, 2""",
    "comments": """
        SELECT c.relname, coalesce(a.attname, ''), d.description
          FROM pg_description d
          JOIN pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass
          LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.objsubid AND d.objsubid > 0
         WHERE c.relnamespace = 'pgembed'::regnamespace
         ORDER BY 1, 2""",
    "schema": """
        SELECT n.nspacl::text, coalesce(obj_description(n.oid, 'pg_namespace'), '')
          FROM pg_namespace n WHERE n.nspname = 'pgembed'""",
    "event_triggers": """
        SELECT e.evtname, e.evtevent, e.evttags::text, e.evtfoid::regprocedure::text, e.evtenabled
          FROM pg_event_trigger e ORDER BY 1""",
    "models": "SELECT * FROM pgembed.models ORDER BY model",
}


def snapshot(dsn: str) -> dict[str, list[tuple[str, ...]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {name: [tuple(map(str, row)) for row in conn.execute(sql)] for name, sql in QUERIES.items()}


def differences(left: dict[str, list[tuple[str, ...]]], right: dict[str, list[tuple[str, ...]]]) -> list[str]:
    """One line per row that only one side has, named by catalog: what a failing test shows."""
    lines = []
    for name in QUERIES:
        only_left = sorted(set(left[name]) - set(right[name]), key=str)
        only_right = sorted(set(right[name]) - set(left[name]), key=str)
        lines += [f"{name}: only in the first: {row}" for row in only_left]
        lines += [f"{name}: only in the second: {row}" for row in only_right]
    return lines
