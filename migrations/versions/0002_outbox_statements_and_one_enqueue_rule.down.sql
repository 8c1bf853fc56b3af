-- Revision 0002, downgrade: back to the tables of 0001 as first shipped. The definitions of
-- 0001 (0001_initial/definitions.sql) are applied right after this file.

-- Keys of unexpanded statements go into the outbox, where 0001 looks for them.
SELECT pgembed.expand_statements(p.name, 1000000000) FROM pgembed.pipelines p;

-- This revision's event triggers go first: they depend on its functions.
DROP EVENT TRIGGER IF EXISTS pgembed_follow_source_ddl;
DROP EVENT TRIGGER IF EXISTS pgembed_unbind_for_drop;
DROP EVENT TRIGGER IF EXISTS pgembed_rebind_after_drop;

-- This revision's functions and views go, generated per-pipeline code aside (0001's
-- generator replaces it): 0001's definitions cannot replace a view that has more columns.
DO $$
DECLARE
    doomed text;
BEGIN
    SELECT pg_catalog.string_agg(c.oid::pg_catalog.regclass::text, ', ') INTO doomed
      FROM pg_catalog.pg_class c WHERE c.relnamespace = 'pgembed'::regnamespace AND c.relkind = 'v';
    IF doomed IS NOT NULL THEN
        EXECUTE 'DROP VIEW ' || doomed;
    END IF;
    SELECT pg_catalog.string_agg(p.oid::pg_catalog.regprocedure::text, ', ') INTO doomed
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace = 'pgembed'::regnamespace AND p.proname !~ '^p[0-9]+_(capture|read|store)$';
    IF doomed IS NOT NULL THEN
        EXECUTE 'DROP FUNCTION ' || doomed;
    END IF;
END
$$;

-- Nor had 0001 comments on its tables, or all of this revision's grants (its own come back
-- with its definitions).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.oid::pg_catalog.regclass AS rel, a.attname
               FROM pg_catalog.pg_description d
               JOIN pg_catalog.pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_catalog.pg_class'::pg_catalog.regclass
               LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.objsubid AND d.objsubid > 0
              WHERE c.relnamespace = 'pgembed'::regnamespace LOOP
        IF r.attname IS NULL THEN
            EXECUTE format('COMMENT ON TABLE %s IS NULL', r.rel);
        ELSE
            EXECUTE format('COMMENT ON COLUMN %s.%I IS NULL', r.rel, r.attname);
        END IF;
    END LOOP;
    COMMENT ON SCHEMA pgembed IS NULL;
    IF (SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname IN ('pgembed_reader', 'pgembed_worker')) = 2 THEN
        REVOKE ALL ON ALL TABLES IN SCHEMA pgembed FROM pgembed_reader, pgembed_worker;
    END IF;
END
$$;

DROP TABLE pgembed.outbox_statements;
DROP TABLE pgembed.audit_findings;
ALTER TABLE pgembed.pipelines DROP COLUMN cost_center_bound;
ALTER TABLE pgembed.outbox DROP CONSTRAINT outbox_lease_holder;
DELETE FROM pgembed.outbox o WHERE NOT EXISTS (SELECT 1 FROM pgembed.pipelines p WHERE p.name = o.pipeline);
ALTER TABLE pgembed.outbox ADD FOREIGN KEY (pipeline) REFERENCES pgembed.pipelines ON DELETE CASCADE;
