-- pgembed roles and privileges. Runs last in every migration and is re-runnable: whatever
-- the other files created or replaced, afterwards the grants are the ones below.
--
-- Two group roles, neither of which can log in; a DBA grants them to login roles (README,
-- "Privileges and roles"):
--   pgembed_reader  a DBA who watches: every view of schema pgembed, and nothing else (not
--                   the queue, the cache, the vectors, nor the application's tables).
--   pgembed_worker  `pgembed worker --no-scheduler`: the least it needs to claim rows, read
--                   them, embed and write. Plus SELECT on each source table, which the DBA
--                   grants (pgembed hands out no rights on the application's tables). The
--                   scheduled jobs (audit repair, clean-up, index upkeep) need the owner.
-- The owner, the role that ran `pgembed init`, owns everything and creates pipelines. The
-- application's roles get nothing: their writes reach the queue through the SECURITY
-- DEFINER triggers.
--
-- Roles belong to the whole cluster, not to one database: the same two serve every database
-- of the cluster that runs pgembed (a member of pgembed_reader reads the views of each of
-- them it may connect to). So init creates them only when they are missing (that needs
-- CREATEROLE, once per cluster), tolerates an init in another database creating them at the
-- same moment, and the downgrade never drops them: other databases may still use them.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY '{pgembed_reader,pgembed_worker}'::text[] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r);
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXECUTE format('COMMENT ON ROLE %I IS %L', r, CASE r
                WHEN 'pgembed_reader' THEN 'pgembed: reads the views of schema pgembed, nothing else'
                ELSE 'pgembed: what a pgembed worker needs (plus SELECT on each source table)' END);
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- an init in another database of the cluster created it meanwhile
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'pgembed: role % does not exist and % may not create roles', r, current_user
                    USING HINT = format('Have a role with CREATEROLE run CREATE ROLE %I NOLOGIN; once for '
                                        'the cluster, then run pgembed init again.', r);
        END;
    END LOOP;
END
$$;

-- A SECURITY DEFINER function runs with the owner's rights: nobody calls one unless granted
-- (the capture triggers fire without EXECUTE; gaps and pipeline_counts are granted below).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'pgembed'::regnamespace AND p.prosecdef LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA pgembed TO pgembed_reader, pgembed_worker;

-- The reader: every view, and the two functions consistency_gaps and pipeline_status call
-- (a view's functions run with the reader's rights; these two are SECURITY DEFINER, see
-- their comments in audit.sql for why that is safe).
DO $$
DECLARE
    v text;
BEGIN
    FOR v IN SELECT format('%I.%I', schemaname, viewname) FROM pg_catalog.pg_views
              WHERE schemaname = 'pgembed'
                AND viewname !~ '^p[0-9]+_(content|cost_center)$'  -- binding views: pgembed's own
                -- an alias's view holds its pipeline's vectors: the DBA grants it (kept across repoints)
                AND viewname NOT IN (SELECT a.name FROM pgembed.aliases a) LOOP
        EXECUTE format('GRANT SELECT ON %s TO pgembed_reader', v);
    END LOOP;
END
$$;
GRANT EXECUTE ON FUNCTION pgembed.gaps(text), pgembed.pipeline_counts(text) TO pgembed_reader;
GRANT SELECT ON pgembed.audit_runs, pgembed.audit_findings, pgembed.failure_classes TO pgembed_reader;
-- search names and evaluation: what each alias points at, the sets, every run
GRANT SELECT ON pgembed.aliases, pgembed.eval_sets, pgembed.eval_runs TO pgembed_reader;
GRANT SELECT ON pgembed.model_migrations, pgembed.model_migration_events, pgembed.bulk_lane TO pgembed_reader;

-- The worker: reads pipelines and models, leases and acknowledges queue rows, keeps the
-- embedding cache, records failures and usage, keeps its heartbeat row, spends the shared
-- rate-limit budget (pgembed.take_budget runs with the caller's rights).
GRANT SELECT ON pgembed.pipelines, pgembed.models TO pgembed_worker;
GRANT SELECT, UPDATE, DELETE ON pgembed.outbox TO pgembed_worker;
GRANT SELECT ON pgembed.outbox_statements TO pgembed_worker;
GRANT EXECUTE ON FUNCTION pgembed.expand_statements(text, bigint) TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgembed.failures TO pgembed_worker;
GRANT SELECT ON pgembed.failure_classes TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE ON pgembed.embedding_cache TO pgembed_worker;
GRANT INSERT ON pgembed.usage TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgembed.workers TO pgembed_worker;
GRANT SELECT ON pgembed.rate_limits TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE ON pgembed.rate_limit_state TO pgembed_worker;
GRANT SELECT ON pgembed.bulk_lane TO pgembed_worker;  -- claim_from reads its window
GRANT EXECUTE ON FUNCTION pgembed.take_bulk_budget(text, int, bigint) TO pgembed_worker;
-- write-through (pgembed/writethrough.py) runs as a worker and resolves an alias, as search does
GRANT SELECT ON pgembed.aliases TO pgembed_worker;
-- Each pipeline's destination table and read/store functions: create_pipeline grants them
-- (pgembed.grant_pipeline_to_workers); again here for the pipelines that exist already.
-- Which HNSW indexes wait for their backfill to end (pgembed.deferred_indexes, service.sql):
-- a worker reads the plan; building one takes the destination's owner, so a pgembed_worker
-- logs that it cannot and leaves it to a worker running as the owner.
-- The schema revision, which a worker reads at start to refuse a schema it does not know
-- (alembic's version table, kept outside schema pgembed: pgembed/migrate.py).
DO $$
BEGIN
    PERFORM pgembed.grant_pipeline_to_workers(p) FROM pgembed.pipelines p;
    IF pg_catalog.to_regclass('pgembed.deferred_indexes') IS NOT NULL THEN
        GRANT SELECT ON pgembed.deferred_indexes TO pgembed_worker;
    END IF;
    IF pg_catalog.to_regclass('public.pgembed_alembic_version') IS NOT NULL THEN
        GRANT SELECT ON public.pgembed_alembic_version TO pgembed_worker;
    END IF;
END
$$;
