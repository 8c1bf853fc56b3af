-- pgembed failures: rows that could not be embedded, their backoff, parking and retry.

-- Records rows that could not be embedded. Each failure counts an attempt; the row goes back
-- to the queue after an exponential backoff, or is parked (leaves the queue) once it has
-- failed p_max_attempts times. Only rows still held under p_lease are touched.
CREATE OR REPLACE FUNCTION pgembed.record_failures(p_pipeline text, p_lease uuid, p_keys jsonb[],
                                                   p_errors text[], p_max_attempts int,
                                                   p_retry_base double precision)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH failed AS (
        SELECT o.key, o.attempts + 1 AS attempts, e.error
          FROM unnest(p_keys, p_errors) AS e(key, error)
          JOIN pgembed.outbox o ON o.pipeline = p_pipeline AND o.key = e.key
         WHERE o.lease_id = p_lease
    ),
    logged AS (
        INSERT INTO pgembed.failures AS f (pipeline, key, error, attempts, parked_at)
        SELECT p_pipeline, key, error, attempts,
               CASE WHEN attempts >= p_max_attempts THEN now() END
          FROM failed
        ON CONFLICT (pipeline, key) DO UPDATE
           SET error = excluded.error, attempts = excluded.attempts,
               last_failed_at = now(), parked_at = excluded.parked_at
        RETURNING f.key, f.attempts, f.parked_at
    ),
    parked AS (
        DELETE FROM pgembed.outbox o USING logged l
         WHERE o.pipeline = p_pipeline AND o.key = l.key AND l.parked_at IS NOT NULL
    )
    UPDATE pgembed.outbox o
       SET attempts = l.attempts, lease_id = NULL, leased_by = NULL,
           available_at = now() + make_interval(secs => p_retry_base * 2 ^ (l.attempts - 1))
      FROM logged l
     WHERE o.pipeline = p_pipeline AND o.key = l.key AND l.parked_at IS NULL;
END
$$;

-- Puts parked failures back in the queue by the one rule (pgembed.enqueue): a key that is
-- in flight meanwhile keeps its lease. p_pipeline NULL: every pipeline. p_min_wait NULL:
-- every parked failure; otherwise only those due on a slow, doubling backoff: a row parked
-- at P that first failed at F is due at P + clamp(P - F, p_min_wait, p_max_wait). So it waits
-- p_min_wait after its first parking, then about as long again as it has been failing: 1h,
-- 1h, 2h, 4h, ... up to p_max_wait.
CREATE OR REPLACE FUNCTION pgembed.requeue_parked(p_pipeline text, p_min_wait interval, p_max_wait interval)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    n bigint := 0;
BEGIN
    FOR r IN
        WITH due AS (
            UPDATE pgembed.failures f SET parked_at = NULL, attempts = 0
             WHERE f.parked_at IS NOT NULL AND (p_pipeline IS NULL OR f.pipeline = p_pipeline)
               AND (p_min_wait IS NULL OR f.parked_at
                    + least(p_max_wait, greatest(p_min_wait, f.parked_at - f.first_failed_at)) <= now())
            RETURNING f.pipeline, f.key
        )
        SELECT pipeline, array_agg(key) AS keys FROM due GROUP BY pipeline
    LOOP
        n := n + pgembed.enqueue(r.pipeline, r.keys, 'retry');
    END LOOP;
    RETURN n;
END
$$;

-- For a DBA (pgembed failures --retry): every parked failure (all pipelines, or one), now.
CREATE OR REPLACE FUNCTION pgembed.retry_failures(p_pipeline text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgembed.requeue_parked(p_pipeline, NULL, NULL) $$;

-- For the scheduled retry job: the parked failures that are due (see requeue_parked).
CREATE OR REPLACE FUNCTION pgembed.retry_parked_failures(p_min_wait interval,
                                                         p_max_wait interval DEFAULT '7 days')
RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgembed.requeue_parked(NULL, p_min_wait, p_max_wait) $$;
