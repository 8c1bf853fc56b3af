-- pgembed worker fleet: heartbeats, scheduled jobs, housekeeping.
--
-- Workers register in pgembed.workers so a DBA sees the fleet in plain SQL next to
-- pg_stat_activity (application_name 'pgembed-worker[<name>]'). Periodic jobs (audit, clean-up,
-- retry of parked failures, index upkeep) run inside the workers; PostgreSQL makes sure
-- each runs once per period however many workers there are: an advisory lock keeps two
-- runs from overlapping, and a unique (job, period_start) keeps a period from running twice.

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

-- Workers whose heartbeat stopped more than p_dead_after seconds ago (killed, their host
-- gone): their leases are given back now, not when they expire (minutes later), and their
-- rows in pgembed.workers are marked dead, so that nobody takes them for running and a DBA
-- sees who died and when it was last seen. Dead rows are kept a day. Called by
-- live workers on every heartbeat and while a drain waits. A worker judged dead that was
-- only paused writes nothing when it wakes (every write is fenced by the lease) and is
-- running again with its next beat, as is a new process under the same name. Returns each
-- worker found dead now and its rows.
CREATE OR REPLACE FUNCTION pgembed.release_dead_workers(p_dead_after double precision,
                                                        p_me text DEFAULT NULL)
RETURNS TABLE (worker text, rows bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    dead text;
    n bigint;
BEGIN
    DELETE FROM pgembed.workers w WHERE w.state = 'dead' AND w.last_seen < now() - interval '1 day';
    FOR dead IN
        SELECT w.name FROM pgembed.workers w
         WHERE w.last_seen < now() - make_interval(secs => p_dead_after)
           AND w.state <> 'dead' AND w.name IS DISTINCT FROM p_me
         ORDER BY w.name
           FOR UPDATE SKIP LOCKED
    LOOP
        UPDATE pgembed.outbox o SET lease_id = NULL, leased_by = NULL,
                                    available_at = LEAST(o.queued_at, now())
         WHERE o.leased_by = dead AND o.lease_id IS NOT NULL AND o.available_at > now();
        GET DIAGNOSTICS n = ROW_COUNT;
        UPDATE pgembed.workers w SET state = 'dead' WHERE w.name = dead;
        worker := dead;
        rows := n;
        RETURN NEXT;
    END LOOP;
END
$$;

-- A worker that exits cleanly leaves no row behind.
CREATE OR REPLACE FUNCTION pgembed.worker_exit(p_name text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ DELETE FROM pgembed.workers WHERE name = p_name; $$;


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

-- The audit job: runs pgembed.audit(p_repair) and returns the run's row, as JSON, for
-- job_runs.detail.
CREATE OR REPLACE FUNCTION pgembed.run_scheduled_audit(p_repair boolean DEFAULT false)
RETURNS text
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT to_jsonb(r)::text FROM pgembed.audit(p_repair) AS r $$;

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

