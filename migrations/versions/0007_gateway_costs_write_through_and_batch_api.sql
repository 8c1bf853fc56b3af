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
-- Rate limits with headroom that learn: a budget is spent up to `headroom` of itself (the
-- rest is the margin for what the provider counts differently), and each bucket keeps what
-- the provider's x-ratelimit-* response headers said: its limit, what remained, when it
-- resets, and what was granted since, so that every worker slows down when the API says
-- fewer remain than the budget thinks.
ALTER TABLE pgembed.rate_limits ADD COLUMN headroom double precision NOT NULL DEFAULT 0.9
    CONSTRAINT "rate_limits: headroom must be > 0 and <= 1" CHECK (headroom > 0 AND headroom <= 1);
ALTER TABLE pgembed.rate_limit_state
    ADD COLUMN api_requests_limit bigint,
    ADD COLUMN api_requests_remaining bigint,
    ADD COLUMN api_requests_reset_at double precision,
    ADD COLUMN api_requests_granted bigint NOT NULL DEFAULT 0,
    ADD COLUMN api_tokens_limit bigint,
    ADD COLUMN api_tokens_remaining bigint,
    ADD COLUMN api_tokens_reset_at double precision,
    ADD COLUMN api_tokens_granted bigint NOT NULL DEFAULT 0,
    ADD COLUMN api_seen_at timestamptz;

-- ---------------------------------------------------------------------------------------
-- The embedding gateway
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- Write-through
-- ---------------------------------------------------------------------------------------

-- no table changes: functions in sql/outbox.sql (claim_keys, given_keys, sync_now,
-- wait_synced) and a grant in sql/privileges.sql (SELECT on pgembed.aliases for
-- pgembed_worker), which the downgrade takes back

-- ---------------------------------------------------------------------------------------
-- The provider's Batch API
-- ---------------------------------------------------------------------------------------

-- A backfill or migration backlog sent through the provider's Batch API (pgembed.batch_api,
-- sql/batch_api.sql). Its rows stay in the outbox, leased to the batch for as long as the
-- provider may take (lease = the outbox rows' lease_id, leased_by 'batch-api:<id>'), so no
-- worker embeds them meanwhile; a change to one bumps its version as for any lease.
CREATE TABLE pgembed.provider_batches (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline        text NOT NULL REFERENCES pgembed.pipelines ON DELETE CASCADE,
    lease           uuid NOT NULL UNIQUE,
    model           text NOT NULL,
    dimensions      int NOT NULL,
    state           text NOT NULL DEFAULT 'preparing'
                    CHECK (state IN ('preparing', 'submitted', 'collected', 'cancelled')),
    provider_status text,  -- the provider's own: validating, in_progress, completed, expired...
    provider_id     text UNIQUE,
    input_file      text,
    rows            int NOT NULL DEFAULT 0,
    lines           int NOT NULL DEFAULT 0,
    inputs          int NOT NULL DEFAULT 0,
    stored          int,
    requeued        int,
    created_at      timestamptz NOT NULL DEFAULT now(),
    submitted_at    timestamptz,
    checked_at      timestamptz,
    finished_at     timestamptz,
    CHECK ((state IN ('collected', 'cancelled')) = (finished_at IS NOT NULL))
);

-- the batches a poll looks at
CREATE INDEX provider_batches_open ON pgembed.provider_batches (pipeline) WHERE state IN ('preparing', 'submitted');

-- The outbox rows a batch holds, at the version it read: what its collection is fenced by.
CREATE TABLE pgembed.provider_batch_rows (
    batch           bigint NOT NULL REFERENCES pgembed.provider_batches ON DELETE CASCADE,
    key             jsonb NOT NULL,
    version         bigint NOT NULL,
    purpose         text NOT NULL,
    attempts        int NOT NULL,
    PRIMARY KEY (batch, key)
);

-- One JSONL line (request) of a batch: custom_id 'line-<line>', the cache keys of its
-- inputs in order, and who pays for it.
CREATE TABLE pgembed.provider_batch_lines (
    batch           bigint NOT NULL REFERENCES pgembed.provider_batches ON DELETE CASCADE,
    line            int NOT NULL,
    purpose         text NOT NULL,
    cost_center     text,
    hashes          bytea[] NOT NULL,
    PRIMARY KEY (batch, line)
);

-- ---------------------------------------------------------------------------------------
-- The read path
-- ---------------------------------------------------------------------------------------

-- No table changes: each pipeline's generated search (pgembed.p<id>_search) is a definition,
-- made by the refresh that follows (sql/pipelines.sql).
