-- pgembed roles with the least rights each needs, as the README's "Privileges and roles"
-- shows them. Run as the role that ran `pgembed init` (the owner of schema pgembed), after
-- it; tests/reliability/test_09_privileges.py runs exactly this file.
--
-- `pgembed init` creates two group roles and keeps their grants up to date (sql/privileges.sql):
-- pgembed_worker and pgembed_reader. What is left to do is give them to login roles, and
-- give the workers the application's tables to read.

-- 1. The application: nothing in pgembed. Its INSERT/UPDATE/DELETE/TRUNCATE reach the queue
--    through pgembed's SECURITY DEFINER triggers. It keeps the rights it has on its tables:
--    GRANT SELECT, INSERT, UPDATE, DELETE ON public.articles TO app;

-- 2. A worker: what pgembed_worker holds (claim and acknowledge queue rows, the cache,
--    failures, usage, its heartbeat row, the shared rate-limit budget, each pipeline's
--    destination table and read/store functions), plus SELECT on each source table, since
--    the content expression runs with the worker's rights:
--    GRANT USAGE ON SCHEMA public TO pgembed_worker;
--    GRANT SELECT ON public.articles TO pgembed_worker;
--    Run it with --no-scheduler: the scheduled jobs (audit repair, cache clean-up, index
--    builds) belong to a maintenance worker running as the owner.
CREATE ROLE embed_worker LOGIN IN ROLE pgembed_worker;

-- 3. A DBA who watches: every view of schema pgembed and nothing else (not the queue, the
--    cache, the vectors, the application's tables).
CREATE ROLE embed_dba LOGIN IN ROLE pgembed_reader;
