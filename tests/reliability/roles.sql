-- pgembed roles with the least rights each needs. Run as the role that ran `pgembed init`
-- (the owner of schema pgembed), after it; tests/reliability/test_09_privileges.py runs
-- exactly this file.

-- 1. The application: nothing in pgembed. Its INSERT/UPDATE/DELETE/TRUNCATE reach the queue
--    through pgembed's SECURITY DEFINER triggers. It keeps the rights it has on its tables:
--    GRANT SELECT, INSERT, UPDATE, DELETE ON public.articles TO app;

-- 2. The worker: reads pipelines and source rows, leases and acknowledges queue rows, keeps
--    the embedding cache, records usage and failures, writes the destination tables.
CREATE ROLE pgembed_worker LOGIN;
GRANT USAGE ON SCHEMA pgembed TO pgembed_worker;
GRANT SELECT ON pgembed.pipelines, pgembed.models TO pgembed_worker;
GRANT SELECT, UPDATE, DELETE ON pgembed.outbox TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgembed.failures TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE ON pgembed.embedding_cache TO pgembed_worker;
GRANT INSERT ON pgembed.usage TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgembed.workers TO pgembed_worker;  -- its heartbeat row
-- the API key's rate-limit budget, shared by every worker (pgembed.take_budget runs with
-- the caller's rights; without these, every batch is put back as in an API outage)
GRANT SELECT ON pgembed.rate_limits TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE ON pgembed.rate_limit_state TO pgembed_worker;
-- the destination tables and per-pipeline read/store functions that create_pipeline makes
-- from now on (run this as the role that creates pipelines)
ALTER DEFAULT PRIVILEGES IN SCHEMA pgembed GRANT SELECT, INSERT, DELETE ON TABLES TO pgembed_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA pgembed GRANT EXECUTE ON FUNCTIONS TO pgembed_worker;
-- and SELECT on each source table (the content expression runs with the worker's rights):
--    GRANT USAGE ON SCHEMA public TO pgembed_worker;
--    GRANT SELECT ON public.articles TO pgembed_worker;
-- Run the worker with --no-scheduler: the scheduled jobs (audit repair, cache clean-up,
-- index builds) belong to a maintenance worker running as the owner.

-- 3. A DBA who watches: the views and nothing else (not the queue, the cache, the vectors).
CREATE ROLE pgembed_dba LOGIN;
GRANT USAGE ON SCHEMA pgembed TO pgembed_dba;
DO $$
DECLARE
    v text;
BEGIN
    FOR v IN SELECT format('%I.%I', schemaname, viewname) FROM pg_catalog.pg_views
              WHERE schemaname = 'pgembed'
    LOOP
        EXECUTE format('GRANT SELECT ON %s TO pgembed_dba', v);
    END LOOP;
END
$$;
-- (run the block again after an upgrade that adds views)
