-- pgembed schema: the tables. Functions live in functions.sql, views in views.sql.
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
    short_name          text NOT NULL CHECK (short_name ~ '^[a-z0-9]{1,12}$')
);

INSERT INTO pgembed.models
    (model, dimensions, shortenable, max_input_tokens, max_batch_inputs, usd_per_1m_tokens, short_name)
VALUES
    ('openai:text-embedding-3-small', 1536, true, 8191, 2048, 0.02, 'te3s'),
    ('openai:text-embedding-3-large', 3072, true, 8191, 2048, 0.13, 'te3l'),
    ('openai:text-embedding-ada-002', 1536, false, 8191, 2048, 0.10, 'ada2'),
    ('local:all-MiniLM-L6-v2', 384, true, 256, 256, 0, 'minilm');

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
    -- the creator's search_path, pinned on the reader so `content` means what it meant
    search_path     text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (chunk_tokens = 0 OR chunk_overlap < chunk_tokens)
);

-- One row per (pipeline, key) that needs embedding. Repeated changes bump `version`.
-- A row is claimable when available_at <= now(); a claim pushes available_at to the
-- lease's expiry and sets lease_id, so a crashed worker's rows come back by themselves.
CREATE TABLE pgembed.outbox (
    pipeline        text NOT NULL REFERENCES pgembed.pipelines ON DELETE CASCADE,
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
    PRIMARY KEY (pipeline, key)
) WITH (fillfactor = 80);  -- room for HOT updates: claims and bumps rewrite rows often

CREATE INDEX outbox_claim ON pgembed.outbox (pipeline, available_at);

-- Rows that could not be embedded. While `parked_at` is NULL the row is still queued and
-- retried with backoff; once parked it leaves the outbox and waits for a DBA
-- (pgembed failures --retry, or pgembed.retry_failures()).
CREATE TABLE pgembed.failures (
    pipeline        text NOT NULL REFERENCES pgembed.pipelines ON DELETE CASCADE,
    key             jsonb NOT NULL,
    error           text NOT NULL,
    attempts        int NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    parked_at       timestamptz,
    PRIMARY KEY (pipeline, key)
);

CREATE INDEX failures_parked ON pgembed.failures (pipeline) WHERE parked_at IS NOT NULL;

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
                    CHECK (purpose IN ('backfill', 'sync', 'repair', 'retry', 'query', 'migration')),
    cost_center     text,
    requests        int NOT NULL DEFAULT 0,
    inputs          int NOT NULL DEFAULT 0,
    tokens          bigint NOT NULL DEFAULT 0,
    cache_hits      int NOT NULL DEFAULT 0,
    cache_misses    int NOT NULL DEFAULT 0,
    worker          text
);

CREATE INDEX usage_at ON pgembed.usage (at);
