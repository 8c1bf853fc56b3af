-- Revision 0006, upgrade: late chunking, indexes that wait for their data, stable search
-- names, evaluation sets and runs, model migrations and the live lane. The definitions
-- (functions, views, grants) and every pipeline's generated code are applied afterwards,
-- from sql/.

-- ---------------------------------------------------------------------------------------
-- Late chunking
-- ---------------------------------------------------------------------------------------

-- Late chunking: the model reads the whole document (window by window) and each chunk's
-- vector is the mean of its own tokens' states, so it carries its document's context. Only
-- a local model gives pgembed those states, and only chunking that makes several chunks of
-- a document has anything to pool. The pipelines that exist keep plain chunking.
ALTER TABLE pgembed.pipelines ADD COLUMN late_chunking boolean NOT NULL DEFAULT false;
ALTER TABLE pgembed.pipelines ADD CONSTRAINT pipelines_late_chunking
    CHECK (NOT late_chunking OR (starts_with(model, 'local:') AND chunking NOT IN ('none', 'truncate')));

-- ---------------------------------------------------------------------------------------
-- Indexes that wait for their data
-- ---------------------------------------------------------------------------------------

-- An IVFFlat index made before 0006 on an empty table and never trained since (no
-- index_builds row) goes; the pipeline's index is deferred, as a new one's is, and a worker
-- builds it once the destination holds enough rows (pgembed.deferred_index_plan). Until
-- then its searches are exact, where the untrained index answered from empty lists.
DO $$
DECLARE
    ix text;
BEGIN
    FOR ix IN SELECT format('pgembed.%I', c.relname)
                FROM pgembed.pipelines p
                JOIN pg_catalog.pg_index i ON i.indrelid = format('pgembed.%I', p.destination)::regclass
                JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
                JOIN pg_catalog.pg_am am ON am.oid = c.relam
               WHERE p.index_type = 'ivfflat' AND am.amname = 'ivfflat'
                 AND NOT EXISTS (SELECT 1 FROM pgembed.index_builds b WHERE b.pipeline = p.name) LOOP
        EXECUTE 'DROP INDEX ' || ix;
    END LOOP;
END
$$;
INSERT INTO pgembed.deferred_indexes (pipeline, rows_queued)
SELECT p.name, 0 FROM pgembed.pipelines p
 WHERE p.index_type = 'ivfflat'
   AND NOT EXISTS (SELECT 1 FROM pgembed.index_builds b WHERE b.pipeline = p.name)
ON CONFLICT (pipeline) DO NOTHING;

-- ---------------------------------------------------------------------------------------
-- Stable search names and evaluation
-- ---------------------------------------------------------------------------------------

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

-- ---------------------------------------------------------------------------------------
-- Model migrations and the live lane
-- ---------------------------------------------------------------------------------------

-- Live changes are claimed before bulk work (backfill, repair, migration): an index of the
-- live rows alone, so that finding them never walks a backlog.
CREATE INDEX outbox_live ON pgembed.outbox (pipeline, available_at) WHERE purpose IN ('sync', 'retry');

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
