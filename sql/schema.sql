-- pgembed schema: every table, index and constraint, as they are at the head revision.
--
-- One-shot DDL. A fresh `pgembed init` does not run this file: it runs the migration
-- revisions (migrations/versions/), and a test proves that their result is identical to this
-- file plus the definitions (tests/test_schema_catalog.py). A change to a table is therefore
-- made twice, on purpose: here, where a DBA reads the schema, and in a new revision, which
-- is what upgrades databases. Functions, views, comments and grants are re-runnable
-- definitions, in the other files of sql/ (see pgembed/schema.py for their order).
--
-- Everything pgembed owns is in schema "pgembed". Application roles get no privilege on
-- it: their writes reach the outbox only through SECURITY DEFINER trigger functions.

CREATE SCHEMA pgembed;
REVOKE ALL ON SCHEMA pgembed FROM PUBLIC;

CREATE EXTENSION IF NOT EXISTS vector;

-- The models pgembed knows, their API limits and their price. A DBA edits prices here;
-- an OpenAI-compatible server's model (vLLM, TEI, Ollama...) is registered with an INSERT.
-- Models named hash:N need no row: they are generated on demand.
CREATE TABLE pgembed.models (
    model               text PRIMARY KEY CHECK (model ~ '^[a-z]+:.+$'),
    dimensions          int NOT NULL CHECK (dimensions BETWEEN 1 AND 16000),
    -- true when the API (or local truncation) can shorten vectors (Matryoshka)
    shortenable         boolean NOT NULL DEFAULT false,
    max_input_tokens    int NOT NULL DEFAULT 8191 CHECK (max_input_tokens > 0),
    max_batch_inputs    int NOT NULL DEFAULT 2048 CHECK (max_batch_inputs > 0),
    max_batch_tokens    int NOT NULL DEFAULT 300000 CHECK (max_batch_tokens > 0),
    usd_per_1m_tokens   numeric(12, 6) NOT NULL DEFAULT 0 CHECK (usd_per_1m_tokens >= 0),
    short_name          text NOT NULL CHECK (short_name ~ '^[a-z0-9]{1,12}$'),
    -- how the model counts tokens: 'cl100k' (OpenAI's), 'model' (a local model's own
    -- tokenizer), NULL (not declared: counted in cl100k with a quarter of the window kept free)
    tokenizer           text CHECK (tokenizer IN ('cl100k', 'model'))
);

INSERT INTO pgembed.models
    (model, dimensions, shortenable, max_input_tokens, max_batch_inputs, usd_per_1m_tokens, short_name, tokenizer)
VALUES
    ('openai:text-embedding-3-small', 1536, true, 8191, 2048, 0.02, 'te3s', 'cl100k'),
    ('openai:text-embedding-3-large', 3072, true, 8191, 2048, 0.13, 'te3l', 'cl100k'),
    ('openai:text-embedding-ada-002', 1536, false, 8191, 2048, 0.10, 'ada2', 'cl100k'),
    ('local:all-MiniLM-L6-v2', 384, true, 256, 256, 0, 'minilm', 'model');

CREATE TABLE pgembed.pipelines (
    name            text PRIMARY KEY,
    id              int GENERATED ALWAYS AS IDENTITY UNIQUE,
    source          regclass NOT NULL,
    content         text NOT NULL,
    -- columns the content expression reads: an UPDATE queues a row only if one changed
    content_columns name[] NOT NULL,
    -- `content` with every name bound when the pipeline was created (deparsed on search_path
    -- pg_catalog: whatever is not in pg_catalog is schema-qualified), and the functions it
    -- calls (regprocedure text). The audit evaluates this text with the owner's rights, so a
    -- function planted later on the creator's search_path can never slip into it; see
    -- pgembed.gaps() in audit.sql.
    content_bound   text NOT NULL,
    content_functions text[] NOT NULL DEFAULT '{}',
    cost_center     text,
    cost_center_bound text,   -- cost_center bound the same way
    model           text NOT NULL,
    dimensions      int NOT NULL CHECK (dimensions > 0),
    destination     name NOT NULL UNIQUE,
    key_columns     name[] NOT NULL CHECK (cardinality(key_columns) > 0),
    key_types       text[] NOT NULL CHECK (cardinality(key_types) = cardinality(key_columns)),
    chunk_tokens    int NOT NULL DEFAULT 0 CHECK (chunk_tokens >= 0),
    chunk_overlap   int NOT NULL DEFAULT 0 CHECK (chunk_overlap >= 0),
    index_type      text NOT NULL CHECK (index_type IN ('hnsw', 'ivfflat', 'none')),
    index_options   jsonb NOT NULL DEFAULT '{}',
    distance        text NOT NULL CHECK (distance IN ('cosine', 'l2', 'ip')),
    -- the creator's search_path, which `content` and `cost_center` were read on (the worker's
    -- reader and the audit evaluate the bound forms, on search_path pg_catalog)
    search_path     text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- how content longer than chunk_tokens is cut: recursive (paragraphs, sentences, words),
    -- markdown (headings, lists, code blocks), tokens (cl100k windows), truncate (its start
    -- only, flagged), none (never: a row too long for the model fails)
    chunking        text NOT NULL DEFAULT 'none'
                    CHECK (chunking IN ('recursive', 'markdown', 'tokens', 'truncate', 'none')),
    -- an expression embedded at the head of every chunk of a row (the title, say), as given;
    -- content_bound then carries it (see pgembed.prefixed_content)
    chunk_prefix    text,
    -- how the vectors are stored: 'vector' (4-byte floats, indexes up to 2,000 dimensions) or
    -- 'halfvec' (2-byte floats, indexes up to 4,000)
    storage         text NOT NULL DEFAULT 'vector' CHECK (storage IN ('vector', 'halfvec')),
    -- 'binary': the HNSW index holds binary_quantize(embedding) (one bit a dimension); a search
    -- reads `rerank` times as many candidates by Hamming distance and re-ranks them by the
    -- stored vectors. 'none': the index holds the vectors themselves.
    quantization    text NOT NULL DEFAULT 'none' CHECK (quantization IN ('none', 'binary')),
    rerank          int CHECK (rerank BETWEEN 1 AND 100),
    -- late chunking: the model reads the whole document (window by window) and each chunk's
    -- vector is the mean of its own tokens' states; a local model's, chunks of a document
    late_chunking   boolean NOT NULL DEFAULT false,
    CHECK (chunk_tokens = 0 OR chunk_overlap < chunk_tokens),
    CONSTRAINT pipelines_chunking_size CHECK ((chunking = 'none') = (chunk_tokens = 0)),
    CONSTRAINT pipelines_quantization_index CHECK (quantization = 'none' OR index_type = 'hnsw'),
    CONSTRAINT pipelines_quantization_rerank CHECK ((quantization = 'none') = (rerank IS NULL)),
    CONSTRAINT pipelines_late_chunking
        CHECK (NOT late_chunking OR (starts_with(model, 'local:') AND chunking NOT IN ('none', 'truncate')))
);

-- One row per (pipeline, key) that needs embedding. Repeated changes bump `version`.
-- A row is claimable when available_at <= now(); a claim pushes available_at to the
-- lease's expiry and sets lease_id, so a crashed worker's rows come back by themselves.
-- No foreign key to pipelines on purpose: its check would lock the pipeline's row (FOR KEY
-- SHARE) in every application transaction that writes a source row, a tenth of the cost of
-- a one-row insert. drop_pipeline deletes the pipeline's queue itself.
CREATE TABLE pgembed.outbox (
    pipeline        text NOT NULL,
    key             jsonb NOT NULL CHECK (jsonb_typeof(key) = 'array'),
    version         bigint NOT NULL DEFAULT 1,
    purpose         text NOT NULL DEFAULT 'sync'
                    CHECK (purpose IN ('backfill', 'sync', 'repair', 'retry', 'migration')),
    queued_at       timestamptz NOT NULL DEFAULT now(),
    changed_at      timestamptz NOT NULL DEFAULT now(),
    available_at    timestamptz NOT NULL DEFAULT now(),
    attempts        int NOT NULL DEFAULT 0,
    lease_id        uuid,
    leased_by       text,
    PRIMARY KEY (pipeline, key),
    -- a lease is one claim by one worker: both set by pgembed.claim, both cleared together
    CONSTRAINT outbox_lease_holder CHECK ((lease_id IS NULL) = (leased_by IS NULL))
) WITH (fillfactor = 80);  -- room for HOT updates: claims and bumps rewrite rows often

CREATE INDEX outbox_claim ON pgembed.outbox (pipeline, available_at);

-- Live changes are claimed before bulk work (backfill, repair, migration): an index of the
-- live rows alone, so that finding them never walks a backlog.
CREATE INDEX outbox_live ON pgembed.outbox (pipeline, available_at) WHERE purpose IN ('sync', 'retry');

-- A statement that writes many rows of a source table (a bulk load, a batch UPDATE) leaves
-- one row here instead of one outbox row per source row: its keys as one array, which costs
-- the application's statement a fifth of its time instead of ten times it. A worker expands
-- the statement's keys into the outbox before it claims (pgembed.claim), off the application's path;
-- until then its keys count as queued (consistency_gaps, pipeline_status). Only tables with
-- a one-column primary key: composite keys are always queued row by row.
CREATE TABLE pgembed.outbox_statements (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline        text NOT NULL,
    keys            text[] NOT NULL,   -- key::text, as the outbox key holds it
    key_count       int NOT NULL,
    expanded        int NOT NULL DEFAULT 0,   -- keys[1:expanded] are in the outbox already
    queued_at       timestamptz NOT NULL DEFAULT now()
);

-- a key array does not compress enough to pay for trying (a third of the capture's cost)
ALTER TABLE pgembed.outbox_statements ALTER COLUMN keys SET STORAGE EXTERNAL;

-- The kinds of failure and the retry policy of each: how many attempts before a row is
-- parked, and whether the scheduled retry job re-queues parked rows of the kind by itself
-- (see sql/failures.sql, pgembed.failure_class, for what falls in which). A DBA may change a
-- policy with an UPDATE; the worker reads it at every failure.
CREATE TABLE pgembed.failure_classes (
    class           text PRIMARY KEY,
    -- attempts before the row is parked; NULL: the worker's --max-attempts
    park_after      int CHECK (park_after >= 1),
    -- whether the scheduled retry job re-queues parked rows of this class by itself
    auto_retry      boolean NOT NULL,
    description     text NOT NULL
);

INSERT INTO pgembed.failure_classes (class, park_after, auto_retry, description) VALUES
    ('input_rejected', 1, false,
     'the provider refused the input (HTTP 400/413/422): the same text fails again'),
    ('too_long', 1, false,
     'the input is over the model''s token limit: chunk it (chunk_tokens) or raise max_input_tokens'),
    ('content_error', 1, false,
     'the content expression raised for the row; a change to the row queues it again'),
    ('bad_vector', NULL, true,
     'the provider returned a vector that cannot be stored (NaN, infinite, all zeros, wrong size)'),
    ('provider_unavailable', NULL, true,
     'the provider answered badly or not at all for this input: transient, retried with backoff'),
    ('unknown', NULL, true,
     'anything else, and failures recorded before failures had classes');

-- Rows that could not be embedded. While `parked_at` is NULL the row is still queued and
-- retried with backoff; once parked it leaves the outbox and waits for a DBA
-- (pgembed failures --retry, or pgembed.retry_failures()) or the scheduled retry job.
CREATE TABLE pgembed.failures (
    pipeline        text NOT NULL REFERENCES pgembed.pipelines ON DELETE CASCADE,
    key             jsonb NOT NULL,
    error           text NOT NULL,
    attempts        int NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    parked_at       timestamptz,
    class           text NOT NULL DEFAULT 'unknown' REFERENCES pgembed.failure_classes,
    PRIMARY KEY (pipeline, key)
);

CREATE INDEX failures_parked ON pgembed.failures (pipeline) WHERE parked_at IS NOT NULL;
CREATE INDEX failures_class ON pgembed.failures (class) WHERE parked_at IS NOT NULL;

-- Embeddings are immutable artifacts: content_hash = sha256(model, dimensions, text),
-- so one row serves every pipeline, table and re-run that embeds the same text.
CREATE TABLE pgembed.embedding_cache (
    content_hash    bytea PRIMARY KEY CHECK (octet_length(content_hash) = 32),
    model           text NOT NULL,
    dimensions      int NOT NULL,
    embedding       vector NOT NULL CHECK (vector_dims(embedding) = dimensions),
    tokens          int NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz NOT NULL DEFAULT now()
);

-- vectors do not compress: store them out of line as they are (see create_pipeline)
ALTER TABLE pgembed.embedding_cache ALTER COLUMN embedding SET STORAGE EXTERNAL;

CREATE INDEX embedding_cache_last_used ON pgembed.embedding_cache (last_used_at);

-- One row per batch a worker finished: what it asked the provider for and what the cache
-- saved. Spend is computed in views from pgembed.models, so a price edit applies at once.
CREATE TABLE pgembed.usage (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    pipeline        text,  -- NULL for ad-hoc query embeddings
    model           text NOT NULL,
    purpose         text NOT NULL
                    CONSTRAINT usage_purpose_check
                    CHECK (purpose IN ('backfill', 'sync', 'repair', 'retry', 'query', 'migration', 'index')),
    cost_center     text,
    requests        int NOT NULL DEFAULT 0,
    inputs          int NOT NULL DEFAULT 0,
    tokens          bigint NOT NULL DEFAULT 0,
    cache_hits      int NOT NULL DEFAULT 0,
    cache_misses    int NOT NULL DEFAULT 0,
    worker          text,
    source          text,  -- the caller's use: user_query, note_index, reindex...
    app_user        text,  -- the application's user (OpenAI's `user` field or a header)
    task            text,  -- what that user was doing
    -- share of the list price billed: 1, or a provider's discount (0.5: OpenAI's Batch API)
    price_factor    numeric NOT NULL DEFAULT 1
                    CONSTRAINT usage_price_factor CHECK (price_factor >= 0 AND price_factor <= 1)
);

CREATE INDEX usage_at ON pgembed.usage (at);


-- One row per audit run (pgembed audit, the scheduler's periodic job), so the trend of each
-- gap kind is visible over time. Counts are what the run found, before any repair.
CREATE TABLE pgembed.audit_runs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at       timestamptz,                 -- NULL only while the run is in progress
    pipeline          text,                        -- NULL: every pipeline; no FK, history outlives a drop
    missing           bigint NOT NULL DEFAULT 0,
    orphaned          bigint NOT NULL DEFAULT 0,
    stale             bigint NOT NULL DEFAULT 0,
    failed            bigint NOT NULL DEFAULT 0,
    oldest_gap_since  timestamptz,                 -- min(since) over the gaps found
    oldest_gap        interval,                    -- started_at - oldest_gap_since
    repaired          boolean NOT NULL DEFAULT false,
    requeued          bigint NOT NULL DEFAULT 0,   -- missing + stale keys put in the outbox
    orphans_deleted   bigint NOT NULL DEFAULT 0,   -- orphaned keys whose vectors were deleted
    CHECK (repaired OR (requeued = 0 AND orphans_deleted = 0))
);

CREATE INDEX audit_runs_started ON pgembed.audit_runs (started_at);

-- What each run found per pipeline: pipeline_status reads its gap counts from the latest.
CREATE TABLE pgembed.audit_findings (
    run               bigint NOT NULL REFERENCES pgembed.audit_runs ON DELETE CASCADE,
    pipeline          text NOT NULL,
    missing           bigint NOT NULL,
    orphaned          bigint NOT NULL,
    stale             bigint NOT NULL,
    failed            bigint NOT NULL,
    gaps_since        timestamptz,                 -- min(since) over its missing, orphaned, stale
    empty             bigint NOT NULL DEFAULT 0,   -- live rows whose content is NULL or blank
    PRIMARY KEY (pipeline, run)
);

-- One row per worker, upserted by its heartbeat and deleted when it exits cleanly. A worker
-- whose heartbeat stopped is marked dead by the live ones (pgembed.release_dead_workers,
-- which gives its leases back) and its row is removed a day later.
CREATE TABLE pgembed.workers (
    name            text PRIMARY KEY,
    host            text NOT NULL,
    pid             int NOT NULL,
    version         text NOT NULL,
    -- running: claiming; stopping: drained on SIGTERM, no new claims; dead: its heartbeat
    -- stopped (killed, its host gone), its leases were given back
    state           text NOT NULL CHECK (state IN ('running', 'stopping', 'dead')),
    concurrency     int NOT NULL DEFAULT 1,
    started_at      timestamptz NOT NULL DEFAULT now(),
    last_seen       timestamptz NOT NULL DEFAULT now(),
    batches         bigint NOT NULL DEFAULT 0,
    rows_written    bigint NOT NULL DEFAULT 0,
    rows_removed    bigint NOT NULL DEFAULT 0,
    rows_failed     bigint NOT NULL DEFAULT 0,
    CHECK (last_seen >= started_at)
);

-- What each worker plans to run and when (seen by `pgembed status`). Workers upsert the row
-- at start and after each run; periods are aligned on the epoch, so all workers agree.
CREATE TABLE pgembed.schedules (
    job             text PRIMARY KEY,
    every           interval NOT NULL CHECK (every > interval '0'),
    next_run_at     timestamptz,
    settings        jsonb NOT NULL DEFAULT '{}',
    updated_by      text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per run of a scheduled job, whoever ran it. finished_at NULL with an old
-- started_at means the run was interrupted (its worker died or was stopped mid-run).
CREATE TABLE pgembed.job_runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job             text NOT NULL,
    -- the period this run stands for: its start time rounded to the schedule's grid
    period_start    timestamptz NOT NULL,
    worker          text NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at     timestamptz,
    ok              boolean,
    detail          text,
    UNIQUE (job, period_start),
    CHECK ((finished_at IS NULL) = (ok IS NULL)),
    CHECK (finished_at IS NULL OR finished_at >= started_at)
);

CREATE INDEX job_runs_started ON pgembed.job_runs (job, started_at DESC);

-- The IVFFlat index a worker trained for a pipeline: how many rows it saw and how many
-- lists it made, so upkeep can tell when the data outgrew it.
CREATE TABLE pgembed.index_builds (
    pipeline        text PRIMARY KEY REFERENCES pgembed.pipelines ON DELETE CASCADE,
    index_name      name NOT NULL,
    lists           int NOT NULL CHECK (lists > 0),
    rows_at_build   bigint NOT NULL CHECK (rows_at_build >= 0),
    built_at        timestamptz NOT NULL DEFAULT now(),
    built_by        text
);

-- HNSW indexes put off while a large backfill loads: create_pipeline decides (at least
-- pgembed.defer_index_rows() rows queued), a worker builds the index CONCURRENTLY once the
-- pipeline has no backfill rows left, then deletes the row.
CREATE TABLE pgembed.deferred_indexes (
    pipeline        text PRIMARY KEY REFERENCES pgembed.pipelines ON DELETE CASCADE,
    rows_queued     bigint NOT NULL CHECK (rows_queued >= 0),
    deferred_at     timestamptz NOT NULL DEFAULT now()
);

-- Shared rate limits (see ratelimit.sql for how the two mechanisms work): one request and
-- token budget per API key, so that every worker, on every host, spends from the same budget.
-- A bucket without a row here, or with both budgets NULL, is not limited.
CREATE TABLE pgembed.rate_limits (
    bucket          text PRIMARY KEY,
    -- NULL: that dimension is not limited
    max_requests    int,
    max_tokens      bigint,
    per_seconds     double precision NOT NULL DEFAULT 60,
    burst_seconds   double precision NOT NULL DEFAULT 1,
    -- for the people reading this table; never the key itself
    base_url        text,
    key_fingerprint text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT "rate_limits: bucket must be 1 to 500 characters"
        CHECK (length(bucket) BETWEEN 1 AND 500),
    CONSTRAINT "rate_limits: max_requests must be > 0 or NULL"
        CHECK (max_requests > 0),
    CONSTRAINT "rate_limits: max_tokens must be > 0 or NULL"
        CHECK (max_tokens > 0),
    CONSTRAINT "rate_limits: per_seconds must be 0.1 to 86400"
        CHECK (per_seconds BETWEEN 0.1 AND 86400),
    CONSTRAINT "rate_limits: burst_seconds must be > 0"
        CHECK (burst_seconds > 0 AND burst_seconds <= 86400),
    CONSTRAINT "rate_limits: key_fingerprint must be 16 hex digits"
        CHECK (key_fingerprint ~ '^[0-9a-f]{16}$'),
    -- (revision 0007) the share of the budget spent: the rest is a margin
    headroom        double precision NOT NULL DEFAULT 0.9
        CONSTRAINT "rate_limits: headroom must be > 0 and <= 1" CHECK (headroom > 0 AND headroom <= 1)
);

-- The moving part of each limited bucket, created by the first take_budget; kept apart from
-- the budgets so that a DBA's UPDATE of a budget never waits behind the workers.
CREATE TABLE pgembed.rate_limit_state (
    bucket           text PRIMARY KEY
                     REFERENCES pgembed.rate_limits ON DELETE CASCADE ON UPDATE CASCADE,
    -- the ring: slot number floor(epoch / slot_seconds) lives at index (number % 61) + 1
    slot_seconds     double precision NOT NULL,
    head_slot        bigint NOT NULL,
    request_slots    bigint[] NOT NULL,
    token_slots      bigint[] NOT NULL,
    -- the pacer: what it holds, as of paced_at (epoch seconds)
    request_level    double precision NOT NULL DEFAULT 0,
    token_level      double precision NOT NULL DEFAULT 0,
    paced_at         double precision NOT NULL,
    -- for pgembed.rate_limit_status
    granted_requests bigint NOT NULL DEFAULT 0,
    granted_tokens   bigint NOT NULL DEFAULT 0,
    waits            bigint NOT NULL DEFAULT 0,
    last_grant_at    timestamptz,
    -- (revision 0007) what the provider's x-ratelimit-* headers said last (pgembed.learn_rate_limit):
    -- its limit, what remained, when that resets (epoch seconds), and what was granted since
    api_requests_limit     bigint,
    api_requests_remaining bigint,
    api_requests_reset_at  double precision,
    api_requests_granted   bigint NOT NULL DEFAULT 0,
    api_tokens_limit       bigint,
    api_tokens_remaining   bigint,
    api_tokens_reset_at    double precision,
    api_tokens_granted     bigint NOT NULL DEFAULT 0,
    api_seen_at            timestamptz
) WITH (fillfactor = 50);  -- room on the page for HOT updates: this row changes constantly


-- ---- Stable search names and evaluation (revision 0006) ----

-- Evaluation sets: queries and the rows (by their source table's primary key) judged
-- relevant or not for each. An import writes a whole set or nothing.
CREATE TABLE pgembed.eval_sets (
    name            text PRIMARY KEY CHECK (name ~ '[^[:space:]]'),
    source          regclass NOT NULL,  -- the table whose primary keys the judgments name
    origin          text NOT NULL CHECK (origin IN ('beir', 'jsonl')),
    imported_at     timestamptz NOT NULL DEFAULT now(),
    imported_by     text NOT NULL DEFAULT current_user
);

CREATE TABLE pgembed.eval_queries (
    eval_set        text NOT NULL REFERENCES pgembed.eval_sets ON DELETE CASCADE,
    query_id        text NOT NULL,
    query           text NOT NULL CHECK (query ~ '[^[:space:]]'),
    PRIMARY KEY (eval_set, query_id)
);

-- relevance 0: judged irrelevant; above 0: relevant, graded (nDCG's gain)
CREATE TABLE pgembed.eval_judgments (
    eval_set        text NOT NULL,
    query_id        text NOT NULL,
    key             jsonb NOT NULL,  -- the row's primary key as pgembed.search returns it
    relevance       int NOT NULL CHECK (relevance >= 0),
    PRIMARY KEY (eval_set, query_id, key),
    FOREIGN KEY (eval_set, query_id) REFERENCES pgembed.eval_queries ON DELETE CASCADE
);

-- A name applications search through, which outlives the pipeline behind it: cutover and
-- rollback repoint it (pgembed.set_alias) in one transaction.
CREATE TABLE pgembed.aliases (
    name            text PRIMARY KEY,
    pipeline        text NOT NULL REFERENCES pgembed.pipelines,
    previous        text REFERENCES pgembed.pipelines ON DELETE SET NULL,
    eval_set        text REFERENCES pgembed.eval_sets ON DELETE SET NULL,
    -- the scheduler re-runs eval_set this often (NULL: never), and pgembed.eval_regressions
    -- lists a run whose nDCG@10 fell more than this below the run before it
    eval_every      interval DEFAULT interval '7 days' CHECK (eval_every > interval '0'),
    regression_threshold double precision NOT NULL DEFAULT 0.02 CHECK (regression_threshold >= 0),
    changed_at      timestamptz NOT NULL DEFAULT now(),
    changed_by      text NOT NULL DEFAULT current_user
);

-- One row per evaluation run: what was asked (an alias or a pipeline), what answered, the
-- means over the set's queries, and what embedding the queries took.
CREATE TABLE pgembed.eval_runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    target          text NOT NULL,
    pipeline        text NOT NULL,  -- no reference: a run outlives its pipeline
    model           text NOT NULL,
    eval_set        text NOT NULL REFERENCES pgembed.eval_sets ON DELETE CASCADE,
    metrics         jsonb NOT NULL,
    ks              int[] NOT NULL,
    queries         int NOT NULL CHECK (queries >= 0),
    query_tokens    bigint NOT NULL DEFAULT 0 CHECK (query_tokens >= 0),
    cost_center     text,
    seconds         double precision NOT NULL DEFAULT 0,
    scheduled       boolean NOT NULL DEFAULT false,
    run_by          text NOT NULL DEFAULT current_user
);

CREATE INDEX eval_runs_set ON pgembed.eval_runs (eval_set, pipeline, at DESC);

-- When the bulk lane may be claimed: one row; opens/closes NULL is always.
CREATE TABLE pgembed.bulk_lane (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    opens           time,
    closes          time,
    time_zone       text NOT NULL DEFAULT 'UTC',
    -- the share of each API key's rate budget bulk requests may take (pgembed.take_bulk_budget)
    rate_share      double precision NOT NULL DEFAULT 1,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT "bulk_lane: opens and closes go together" CHECK ((opens IS NULL) = (closes IS NULL)),
    CONSTRAINT "bulk_lane: opens and closes must differ" CHECK (opens <> closes),
    CONSTRAINT "bulk_lane: rate_share must be above 0 and at most 1" CHECK (rate_share > 0 AND rate_share <= 1)
);

INSERT INTO pgembed.bulk_lane DEFAULT VALUES;

-- One row per model migration of an alias: from the pipeline the alias pointed at to a
-- shadow pipeline of the same source with the new model. No foreign keys to pipelines: the
-- history outlives the pipelines that cleanup drops.
CREATE TABLE pgembed.model_migrations (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alias           text NOT NULL,
    from_pipeline   text NOT NULL,
    to_pipeline     text NOT NULL,
    from_model      text NOT NULL,
    to_model        text NOT NULL,
    to_dimensions   int NOT NULL,
    phase           text NOT NULL DEFAULT 'started'
                    CHECK (phase IN ('started', 'cut_over', 'rolled_back', 'cleaned_up')),
    estimate        jsonb NOT NULL DEFAULT '{}',
    eval_set        text,
    max_drop        numeric NOT NULL DEFAULT 3 CHECK (max_drop >= 0),
    rollback_window interval NOT NULL DEFAULT '48 hours' CHECK (rollback_window > interval '0'),
    started_at      timestamptz NOT NULL DEFAULT now(),
    started_by      text NOT NULL DEFAULT current_user,
    cut_over_at     timestamptz,
    finished_at     timestamptz,
    CHECK (phase NOT IN ('cut_over', 'rolled_back') OR cut_over_at IS NOT NULL),
    CHECK ((phase = 'cleaned_up') = (finished_at IS NOT NULL))
);

-- at most one migration of an alias not yet cleaned up
CREATE UNIQUE INDEX model_migrations_open ON pgembed.model_migrations (alias) WHERE phase <> 'cleaned_up';

-- Every phase a migration went through, and every refused or forced cutover, with who.
CREATE TABLE pgembed.model_migration_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration       bigint NOT NULL REFERENCES pgembed.model_migrations ON DELETE CASCADE,
    at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    event           text NOT NULL CHECK (event IN ('started', 'evaluated', 'cutover_refused', 'cut_over',
                                                   'rolled_back', 'cleaned_up')),
    by_user         text NOT NULL DEFAULT current_user,
    detail          jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX model_migration_events_migration ON pgembed.model_migration_events (migration, at);

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
