-- pgembed refresh: the end of every upgrade, after the other definitions were applied.
--
-- 1. Drops the functions and views of schema pgembed that the definitions no longer define:
--    everything this transaction did not create or replace (its pg_proc or pg_rewrite row
--    is older than this transaction: age(xmin) > age(our xid), subtransactions included,
--    since their xids come later), except the generated per-pipeline functions
--    (p<id>_capture, p<id>_read, p<id>_store, p<id>_search), which step 2 replaces, and the binding views
--    (p<id>_content, p<id>_cost_center, see schema_changes.sql), which follow their tables. Without CASCADE: if an
--    object of the application's depends on one of them, the upgrade stops and says which.
-- 2. Regenerates every pipeline's code with the generator just installed.
DO $$
DECLARE
    me xid := pg_catalog.xid(pg_catalog.pg_current_xact_id());
    stale text;
BEGIN
    SELECT pg_catalog.string_agg(c.oid::pg_catalog.regclass::text, ', ') INTO stale
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_rewrite r ON r.ev_class = c.oid
     WHERE c.relnamespace = 'pgembed'::regnamespace AND c.relkind = 'v' AND pg_catalog.age(r.xmin) > pg_catalog.age(me)
       AND c.relname !~ '^p[0-9]+_(content|cost_center)$';
    IF stale IS NOT NULL THEN
        EXECUTE 'DROP VIEW ' || stale;
    END IF;
    SELECT pg_catalog.string_agg(p.oid::pg_catalog.regprocedure::text, ', ') INTO stale
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace = 'pgembed'::regnamespace AND pg_catalog.age(p.xmin) > pg_catalog.age(me)
       AND p.proname !~ '^p[0-9]+_(capture|read|store|search)$';
    IF stale IS NOT NULL THEN
        EXECUTE 'DROP FUNCTION ' || stale;
    END IF;
END
$$;

SELECT pgembed.regenerate_all_pipelines();
