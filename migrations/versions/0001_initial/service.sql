-- pgembed worker fleet: heartbeats, scheduled jobs, IVFFlat upkeep.
--
-- Workers register here (pgembed.workers) so a DBA sees the fleet in plain SQL next to
-- pg_stat_activity (application_name 'pgembed-worker'). Periodic jobs (audit, clean-up,
-- retry of parked failures, index upkeep) run inside the workers; PostgreSQL makes sure
-- each runs once per period however many workers there are: an advisory lock keeps two
-- runs from overlapping, and a unique (job, period_start) keeps a period from running twice.

-- One row per running worker, upserted by its heartbeat and deleted when it exits cleanly.
-- A row whose last_seen is old belongs to a worker that died; its leases expire by
-- themselves and the clean-up job removes the row after a day.
CREATE TABLE pgembed.workers (
    name            text PRIMARY KEY,
    host            text NOT NULL,
    pid             int NOT NULL,
    version         text NOT NULL,
    -- running: claiming; stopping: drained on SIGTERM, no new claims
    state           text NOT NULL CHECK (state IN ('running', 'stopping')),
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

-- Heartbeat: one upsert per beat; statistics are the worker's totals since it started.
-- p_starting marks the first beat of a process, which resets started_at (a worker name
-- can come back: a fixed --name, or a pid reused after a crash).
CREATE OR REPLACE FUNCTION pgembed.heartbeat(p_name text, p_host text, p_pid int, p_version text,
                                             p_state text, p_concurrency int, p_batches bigint,
                                             p_written bigint, p_removed bigint, p_failed bigint,
                                             p_starting boolean DEFAULT false)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgembed.workers AS w (name, host, pid, version, state, concurrency, batches,
                                      rows_written, rows_removed, rows_failed)
    VALUES (p_name, p_host, p_pid, p_version, p_state, p_concurrency, p_batches, p_written,
            p_removed, p_failed)
    ON CONFLICT (name) DO UPDATE
       SET host = excluded.host, pid = excluded.pid, version = excluded.version,
           state = excluded.state, concurrency = excluded.concurrency,
           batches = excluded.batches, rows_written = excluded.rows_written,
           rows_removed = excluded.rows_removed, rows_failed = excluded.rows_failed,
           started_at = CASE WHEN p_starting THEN now() ELSE w.started_at END,
           last_seen = CASE WHEN p_starting THEN now() ELSE greatest(now(), w.started_at) END;
$$;

-- A worker that exits cleanly leaves no row behind.
CREATE OR REPLACE FUNCTION pgembed.worker_exit(p_name text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ DELETE FROM pgembed.workers WHERE name = p_name; $$;

-- Queue depth for metrics and status lines: ready to claim, leased by a worker, backing off.
CREATE OR REPLACE FUNCTION pgembed.queue_depth(OUT ready bigint, OUT leased bigint, OUT waiting bigint)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*) FILTER (WHERE available_at <= now()),
           count(*) FILTER (WHERE available_at > now() AND lease_id IS NOT NULL),
           count(*) FILTER (WHERE available_at > now() AND lease_id IS NULL)
      FROM pgembed.outbox;
$$;

-- Session-level advisory lock of a job: held while the job runs, on the running worker's
-- own connection, so a run that outlasts its period keeps other workers out. The first
-- key is pgembed's namespace, so the locks never collide with the application's.
CREATE OR REPLACE FUNCTION pgembed.try_job_lock(p_job text)
RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_try_advisory_lock(hashtext('pgembed.jobs'), hashtext(p_job)) $$;

CREATE OR REPLACE FUNCTION pgembed.job_unlock(p_job text)
RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_advisory_unlock(hashtext('pgembed.jobs'), hashtext(p_job)) $$;

-- Starts a run for the current period, or returns NULL when another worker already ran
-- this period. The period is the database clock rounded to the schedule's grid, so workers
-- whose clocks differ by less than half a period agree on it.
CREATE OR REPLACE FUNCTION pgembed.start_job_run(p_job text, p_worker text, p_every_seconds double precision)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    period timestamptz := to_timestamp(
        round(extract(epoch FROM clock_timestamp()) / p_every_seconds) * p_every_seconds);
    run_id bigint;
BEGIN
    INSERT INTO pgembed.job_runs (job, period_start, worker)
    VALUES (p_job, period, p_worker)
    ON CONFLICT (job, period_start) DO NOTHING
    RETURNING id INTO run_id;
    RETURN run_id;
END
$$;

CREATE OR REPLACE FUNCTION pgembed.finish_job_run(p_id bigint, p_ok boolean, p_detail text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE pgembed.job_runs SET finished_at = clock_timestamp(), ok = p_ok, detail = p_detail
     WHERE id = p_id;
$$;

CREATE OR REPLACE FUNCTION pgembed.upsert_schedule(p_job text, p_every_seconds double precision,
                                                   p_next_run_at timestamptz, p_settings jsonb,
                                                   p_worker text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgembed.schedules AS s (job, every, next_run_at, settings, updated_by)
    VALUES (p_job, make_interval(secs => p_every_seconds), p_next_run_at, p_settings, p_worker)
    ON CONFLICT (job) DO UPDATE
       SET every = excluded.every, next_run_at = excluded.next_run_at,
           settings = excluded.settings, updated_by = excluded.updated_by, updated_at = now();
$$;

-- The audit job: runs pgembed.audit() when it is installed and callable without
-- arguments (its parameters have defaults), with p_repair => true when asked to repair,
-- and returns what it returned (as JSON) for job_runs.detail.
CREATE OR REPLACE FUNCTION pgembed.run_scheduled_audit(p_repair boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc
                    WHERE pronamespace = 'pgembed'::regnamespace AND proname = 'audit'
                      AND pronargs = pronargdefaults) THEN
        RETURN 'pgembed.audit() is not installed; nothing to do';
    END IF;
    -- works whether audit() returns a scalar, a row or a set of rows
    EXECUTE format('SELECT string_agg(to_jsonb(r)::text, E''\n'') FROM pgembed.audit(%s) AS r',
                   CASE WHEN p_repair THEN 'p_repair => true' ELSE '' END)
       INTO result;
    RETURN coalesce(result, 'done');
END
$$;

-- Housekeeping: cache entries unused for p_unused_for (at most p_limit per call, so the
-- caller can loop in short transactions), job runs and dead workers' rows past their use.
CREATE OR REPLACE FUNCTION pgembed.clean_cache(p_unused_for interval, p_limit int DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM pgembed.embedding_cache c
     WHERE c.content_hash IN (SELECT content_hash FROM pgembed.embedding_cache
                               WHERE last_used_at < now() - p_unused_for
                               LIMIT p_limit FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION pgembed.prune_service_rows(p_job_runs_kept interval DEFAULT '30 days',
                                                      p_dead_worker_after interval DEFAULT '1 day',
                                                      OUT job_runs bigint, OUT workers bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM pgembed.job_runs WHERE started_at < now() - p_job_runs_kept;
    GET DIAGNOSTICS job_runs = ROW_COUNT;
    DELETE FROM pgembed.workers WHERE last_seen < now() - p_dead_worker_after;
    GET DIAGNOSTICS workers = ROW_COUNT;
END
$$;

-- Re-queues parked failures on a slow, doubling backoff: a row parked at P that first failed
-- at F is retried at P + clamp(P - F, p_min_wait, p_max_wait). So it waits p_min_wait after
-- its first parking, then about as long again as it has been failing: 1h, 1h, 2h, 4h, ...
-- up to p_max_wait. (pgembed.retry_failures() re-queues everything at once, for a DBA.)
CREATE OR REPLACE FUNCTION pgembed.retry_parked_failures(p_min_wait interval,
                                                         p_max_wait interval DEFAULT '7 days')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    WITH due AS (
        UPDATE pgembed.failures f SET parked_at = NULL, attempts = 0
         WHERE f.parked_at IS NOT NULL
           AND f.parked_at + least(p_max_wait, greatest(p_min_wait, f.parked_at - f.first_failed_at)) <= now()
        RETURNING f.pipeline, f.key
    )
    INSERT INTO pgembed.outbox AS q (pipeline, key, purpose)
    SELECT pipeline, key, 'retry' FROM due
    ON CONFLICT (pipeline, key) DO UPDATE
       SET attempts = 0,
           available_at = CASE WHEN q.lease_id IS NULL THEN now() ELSE q.available_at END;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_catalog.pg_notify('pgembed', '');
    END IF;
    RETURN n;
END
$$;

-- IVFFlat upkeep plan, one row per ivfflat pipeline. An IVFFlat index is trained on the rows
-- present when it is built: the one create_pipeline makes on an empty table is useless, so
-- a worker rebuilds it once the table holds p_min_rows vectors, with lists = rows / 1000
-- (sqrt(rows) past a million, at least 10; an explicit index_options.lists wins). Later,
-- when the table has grown p_rebuild_factor times, the plan says so ('rebuild_advised').
--   action: 'wait' (too few rows), 'build', 'rebuild_advised', 'ok'
--   create_sql / drop_sql: the statements to run (CONCURRENTLY, so outside a transaction)
CREATE OR REPLACE FUNCTION pgembed.ivfflat_plan(p_min_rows bigint, p_rebuild_factor double precision)
RETURNS TABLE (pipeline text, destination name, row_count bigint, built_rows bigint,
               built_lists int, lists int, action text, index_name text, create_sql text,
               drop_sql text[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    b pgembed.index_builds;
    current_ok boolean;
    ops text;
BEGIN
    FOR p IN SELECT * FROM pgembed.pipelines q WHERE q.index_type = 'ivfflat' ORDER BY q.name LOOP
        pipeline := p.name;
        destination := p.destination;
        EXECUTE format('SELECT count(*) FROM pgembed.%I', p.destination) INTO row_count;
        SELECT * INTO b FROM pgembed.index_builds ib WHERE ib.pipeline = p.name;
        built_rows := b.rows_at_build;
        built_lists := b.lists;
        lists := coalesce((p.index_options ->> 'lists')::int,
                          CASE WHEN row_count <= 1000000 THEN greatest(10, row_count / 1000)
                               ELSE ceil(sqrt(row_count)) END);
        -- the recorded index must still exist and be valid (a failed CONCURRENTLY build is not)
        SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
                        WHERE c.relname = b.index_name AND c.relnamespace = 'pgembed'::regnamespace
                          AND i.indisvalid)
          INTO current_ok;
        action := CASE
            WHEN row_count < greatest(p_min_rows, 1) THEN 'wait'
            WHEN b.pipeline IS NULL OR NOT current_ok THEN 'build'
            WHEN row_count >= b.rows_at_build * p_rebuild_factor THEN 'rebuild_advised'
            ELSE 'ok' END;
        index_name := left(p.destination, 40) || '_ivfflat_'
                      || to_char(clock_timestamp(), 'YYYYMMDDHH24MISS');
        ops := CASE p.distance WHEN 'cosine' THEN 'vector_cosine_ops'
                               WHEN 'l2' THEN 'vector_l2_ops' ELSE 'vector_ip_ops' END;
        create_sql := format('CREATE INDEX CONCURRENTLY %I ON pgembed.%I USING ivfflat (embedding %s.%s) '
                             'WITH (lists = %s)', index_name, p.destination,
                             pgembed.vector_schema(), ops, lists);
        -- every other ivfflat index on the destination goes once the new one is valid
        SELECT coalesce(array_agg(format('DROP INDEX CONCURRENTLY IF EXISTS pgembed.%I', c.relname)
                                  ORDER BY c.relname), '{}')
          INTO drop_sql
          FROM pg_catalog.pg_index i
          JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
          JOIN pg_catalog.pg_am am ON am.oid = c.relam
         WHERE i.indrelid = format('pgembed.%I', p.destination)::regclass
           AND am.amname = 'ivfflat' AND c.relname <> index_name;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgembed.record_index_build(p_pipeline text, p_index_name name, p_lists int,
                                                      p_rows bigint, p_worker text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgembed.index_builds AS b (pipeline, index_name, lists, rows_at_build, built_by)
    VALUES (p_pipeline, p_index_name, p_lists, p_rows, p_worker)
    ON CONFLICT (pipeline) DO UPDATE
       SET index_name = excluded.index_name, lists = excluded.lists,
           rows_at_build = excluded.rows_at_build, built_at = now(), built_by = excluded.built_by;
$$;

-- HNSW indexes put off while a large backfill loads: create_pipeline decides (at least
-- pgembed.defer_index_rows() rows queued), a worker builds the index CONCURRENTLY once the
-- pipeline has no backfill rows left, then deletes the row.
CREATE TABLE pgembed.deferred_indexes (
    pipeline        text PRIMARY KEY REFERENCES pgembed.pipelines ON DELETE CASCADE,
    rows_queued     bigint NOT NULL CHECK (rows_queued >= 0),
    deferred_at     timestamptz NOT NULL DEFAULT now()
);

-- Below this many rows a backfill goes straight into the index: building it afterwards
-- saves little, and the index is there at once.
CREATE OR REPLACE FUNCTION pgembed.defer_index_rows()
RETURNS bigint
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 10000::bigint $$;

-- Deferred indexes whose backfill is over, with the statements that build them (outside a
-- transaction: CONCURRENTLY) and that first drop what an interrupted build left (an
-- INVALID index of the same kind on the destination).
CREATE OR REPLACE FUNCTION pgembed.deferred_index_plan()
RETURNS TABLE (pipeline text, create_sql text, drop_sql text[])
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.name, pgembed.vector_index_sql(p, true),
           ARRAY(SELECT format('DROP INDEX CONCURRENTLY IF EXISTS pgembed.%I', c.relname)
                   FROM pg_catalog.pg_index i
                   JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
                   JOIN pg_catalog.pg_am am ON am.oid = c.relam
                  WHERE i.indrelid = format('pgembed.%I', p.destination)::regclass
                    AND am.amname = p.index_type AND NOT i.indisvalid
                  ORDER BY c.relname)
      FROM pgembed.deferred_indexes d
      JOIN pgembed.pipelines p ON p.name = d.pipeline
     WHERE NOT EXISTS (SELECT 1 FROM pgembed.outbox o
                        WHERE o.pipeline = d.pipeline AND o.purpose = 'backfill')
     ORDER BY p.name;
$$;
