-- Revision 0007, downgrade: back to the tables of 0006. Sections in the reverse order of
-- the upgrade's.

-- ---------------------------------------------------------------------------------------
-- The read path
-- ---------------------------------------------------------------------------------------

-- No table changes. The generated searches (p<id>_search) go with 0006's refresh, which
-- keeps no such functions.

-- ---------------------------------------------------------------------------------------
-- The provider's Batch API
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- Write-through
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- The embedding gateway
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- Cost by source, user and task
-- ---------------------------------------------------------------------------------------

-- (costs: more here)
-- rows of the gateway's documents are kept, as the query embeddings they are closest to
UPDATE pgembed.usage SET purpose = 'query' WHERE purpose = 'index';
ALTER TABLE pgembed.usage DROP CONSTRAINT usage_purpose_check;
ALTER TABLE pgembed.usage ADD CONSTRAINT usage_purpose_check
    CHECK (purpose IN ('backfill', 'sync', 'repair', 'retry', 'query', 'migration'));
ALTER TABLE pgembed.usage DROP COLUMN price_factor, DROP COLUMN task, DROP COLUMN app_user, DROP COLUMN source;

-- Functions whose arguments changed in 0007 go by name: the definitions of 0006, applied
-- next, create theirs, and two overloads of one name would make every call ambiguous. So do
-- the functions 0007 added. One name a line, per section.
DO $$
DECLARE
    f text;
BEGIN
    FOR f IN SELECT q.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc q
              WHERE q.pronamespace = 'pgembed'::regnamespace
                AND q.proname IN (
                    -- cost by source, user and task
                    '',
                    -- the embedding gateway
                    '',
                    -- write-through
                    '',
                    -- the provider's Batch API
                    '',
                    -- the read path
                    'best_chunk_per_row_sql', 'search_function', 'generate_search_function'
                ) LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$$;
