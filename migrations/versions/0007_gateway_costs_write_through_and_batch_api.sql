-- Revision 0007, upgrade: cost by source, user and task; the embedding gateway;
-- write-through; the provider's Batch API; the read path. The definitions (functions,
-- views, grants) and every pipeline's generated code are applied afterwards, from sql/.

-- ---------------------------------------------------------------------------------------
-- Cost by source, user and task
-- ---------------------------------------------------------------------------------------

-- Who asked and what for, beside the pipeline's cost center: source names the caller's use
-- (user_query, note_index, reindex...), app_user the application's user (the OpenAI `user`
-- field or a header), task what the user was doing. NULL: nobody said. Rows written before
-- 0007 keep NULL.
ALTER TABLE pgembed.usage ADD COLUMN source text, ADD COLUMN app_user text, ADD COLUMN task text;
-- 'index': documents an application embeds through the gateway for its own index (the
-- other purposes are the worker's and search's)
ALTER TABLE pgembed.usage DROP CONSTRAINT usage_purpose_check;
ALTER TABLE pgembed.usage ADD CONSTRAINT usage_purpose_check
    CHECK (purpose IN ('backfill', 'sync', 'repair', 'retry', 'query', 'migration', 'index'));
-- What share of the model's list price a row is billed at: 1, or the provider's discount
-- (0.5 for OpenAI's Batch API). The cost views multiply by it.
ALTER TABLE pgembed.usage ADD COLUMN price_factor numeric NOT NULL DEFAULT 1
    CONSTRAINT usage_price_factor CHECK (price_factor >= 0 AND price_factor <= 1);
-- (costs: more here)

-- ---------------------------------------------------------------------------------------
-- The embedding gateway
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- Write-through
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- The provider's Batch API
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- The read path
-- ---------------------------------------------------------------------------------------

-- No table changes: each pipeline's generated search (pgembed.p<id>_search) is a definition,
-- made by the refresh that follows (sql/pipelines.sql).
