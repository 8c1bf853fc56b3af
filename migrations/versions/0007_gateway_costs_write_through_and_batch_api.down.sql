-- Revision 0007, downgrade: back to the tables of 0006. Sections in the reverse order of
-- the upgrade's.

-- ---------------------------------------------------------------------------------------
-- The read path
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- The provider's Batch API
-- ---------------------------------------------------------------------------------------

-- rows still out in a batch go back to their place in line: nothing will collect them
UPDATE pgembed.outbox o SET lease_id = NULL, leased_by = NULL, available_at = LEAST(o.queued_at, now())
  FROM pgembed.provider_batches b
 WHERE b.state IN ('preparing', 'submitted') AND o.lease_id = b.lease;
DROP VIEW pgembed.provider_batch_status;
DROP TABLE pgembed.provider_batch_lines, pgembed.provider_batch_rows, pgembed.provider_batches;

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
                    'batch_api_claim', 'batch_api_submitted', 'batch_api_finish',
                    'batch_api_release_changed',
                    -- the read path
                    ''
                ) LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$$;
