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

-- rows still out in a batch go back to their place in line: nothing will collect them
UPDATE pgembed.outbox o SET lease_id = NULL, leased_by = NULL, available_at = LEAST(o.queued_at, now())
  FROM pgembed.provider_batches b
 WHERE b.state IN ('preparing', 'submitted') AND o.lease_id = b.lease;
DROP VIEW pgembed.provider_batch_status;
DROP TABLE pgembed.provider_batch_lines, pgembed.provider_batch_rows, pgembed.provider_batches;

-- ---------------------------------------------------------------------------------------
-- Write-through
-- ---------------------------------------------------------------------------------------

-- no table changes; the grant sql/privileges.sql gives write-through (a worker resolving an
-- alias), which 0006's definitions do not take back
REVOKE SELECT ON pgembed.aliases FROM pgembed_worker;

-- ---------------------------------------------------------------------------------------
-- The embedding gateway
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- Cost by source, user and task
-- ---------------------------------------------------------------------------------------

-- The cost views that read the new columns: the 0006 definitions re-applied afterwards
-- cannot CREATE OR REPLACE a view with fewer columns. usage_cost goes with the views that
-- read it (0006 re-creates them), named: no CASCADE, so that a DBA's own view on them stops
-- the downgrade with PostgreSQL's message instead of vanishing.
DROP VIEW IF EXISTS pgembed.cost_by_user, pgembed.cost_by_task, pgembed.cost_by_attribution,
    pgembed.cost_share_daily, pgembed.cost_source_anomalies;
DROP VIEW IF EXISTS pgembed.model_migration_status, pgembed.cost_daily, pgembed.cost_by_cost_center,
    pgembed.usage_cost;
-- what the rate limits learnt, and their headroom (the status view reads them)
DROP VIEW IF EXISTS pgembed.rate_limit_status;
ALTER TABLE pgembed.rate_limit_state
    DROP COLUMN api_requests_limit, DROP COLUMN api_requests_remaining, DROP COLUMN api_requests_reset_at,
    DROP COLUMN api_requests_granted, DROP COLUMN api_tokens_limit, DROP COLUMN api_tokens_remaining,
    DROP COLUMN api_tokens_reset_at, DROP COLUMN api_tokens_granted, DROP COLUMN api_seen_at;
ALTER TABLE pgembed.rate_limits DROP COLUMN headroom;
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
                    'cost_anomalies_by', 'find_source_anomalies', 'set_rate_limit', 'learn_rate_limit',
                    -- the embedding gateway
                    '',
                    -- write-through
                    'claim_keys', 'given_keys', 'sync_now', 'wait_synced',
                    -- the provider's Batch API
                    'batch_api_claim', 'batch_api_submitted', 'batch_api_finish',
                    'batch_api_release_changed',
                    -- the read path
                    'best_chunk_per_row_sql', 'search_function', 'generate_search_function'
                ) LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$$;
