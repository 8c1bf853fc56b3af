-- pgembed failures: rows that could not be embedded, their class, backoff, parking and retry.
--
-- The retry policy, one row per class in pgembed.failure_classes (a DBA reads and may edit
-- it there; README, "Failures", says the same):
--
--   class                 what                                      parked after     scheduled retry
--   input_rejected        the provider refused the input (4xx)      1 attempt        no
--   too_long              over the model's input limit              1 attempt        no
--   content_error         the content expression raised for the row 1 attempt        no
--   bad_vector            NaN, infinite, all-zero, wrong size       --max-attempts   yes
--   provider_unavailable  the provider answered badly for the input --max-attempts   yes
--   unknown               anything else; failures from before 0003  --max-attempts   yes
--
-- Until it is parked a row is retried with exponential backoff (--retry-base). The same input
-- is refused again, so the first three are parked at once and wait for their cause to be
-- fixed: then `pgembed failures --retry --class CLASS` (pgembed.retry_failures(class => ...))
-- queues them again. A whole request that fails (timeouts, 5xx, connection errors, after the
-- provider's own retries) is no row's failure: the worker puts the batch back for
-- --outage-backoff seconds without counting an attempt.

-- The class of a failure, from its message: the worker's messages are pgembed's own (the
-- reader's, the batch's checks of vectors, the providers'), so each kind is recognised by
-- how it starts; a chunk's message starts with "chunk N: ".
CREATE OR REPLACE FUNCTION pgembed.failure_class(p_error text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN m ~ '^content expression failed: ' THEN 'content_error'
        -- a group the provider refused that was not split down to the bad input: most of it may
        -- be fine, so it is retried like anything else
        WHEN m ~ 'too many rejections in this batch to isolate the bad input' THEN 'unknown'
        WHEN m ~ '^(input|text) has [0-9]+ tokens, (over|more than) the model''s limit'
          OR m ~* '^rejected by the API \(HTTP [0-9]+\):.*(context length|too long|too many tokens|maximum.*tokens)'
             THEN 'too_long'
        WHEN m ~ '^rejected by the API \(HTTP [0-9]+\)' OR m = 'empty text' THEN 'input_rejected'
        WHEN m ~ '^provider returned (a |an |[0-9]+ dimensions)' THEN 'bad_vector'
        WHEN m ~ '^(embedding API returned |provider returned no vector|the request that was embedding)'
             THEN 'provider_unavailable'
        ELSE 'unknown' END
      FROM (SELECT regexp_replace(p_error, '^chunk [0-9]+: ', '') AS m) AS x
$$;

-- Records rows that could not be embedded. Each failure counts an attempt and is classified;
-- the row goes back to the queue after an exponential backoff, or is parked (leaves the
-- queue) once it has failed as often as its class allows (failure_classes.park_after, or
-- p_max_attempts). Only rows still held under p_lease are touched.
CREATE OR REPLACE FUNCTION pgembed.record_failures(p_pipeline text, p_lease uuid, p_keys jsonb[],
                                                   p_errors text[], p_max_attempts int,
                                                   p_retry_base double precision)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH failed AS (
        SELECT o.key, o.attempts + 1 AS attempts, e.error, coalesce(c.class, 'unknown') AS class,
               coalesce(c.park_after, p_max_attempts) AS park_after
          FROM unnest(p_keys, p_errors) AS e(key, error)
          JOIN pgembed.outbox o ON o.pipeline = p_pipeline AND o.key = e.key
          -- a class a DBA deleted from the policy counts as unknown
          LEFT JOIN pgembed.failure_classes c ON c.class = pgembed.failure_class(e.error)
         WHERE o.lease_id = p_lease
    ),
    logged AS (
        INSERT INTO pgembed.failures AS f (pipeline, key, error, class, attempts, parked_at)
        SELECT p_pipeline, key, error, class, attempts,
               CASE WHEN attempts >= park_after THEN now() END
          FROM failed
        ON CONFLICT (pipeline, key) DO UPDATE
           SET error = excluded.error, class = excluded.class, attempts = excluded.attempts,
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
-- in flight meanwhile keeps its lease. p_pipeline NULL: every pipeline; p_class NULL: every
-- class. p_min_wait NULL: every parked failure of those; otherwise only those of classes
-- the scheduled job retries (failure_classes.auto_retry) that are due on a slow, doubling
-- backoff: a row parked at P that first failed at F is due at
-- P + clamp(P - F, p_min_wait, p_max_wait). So it waits p_min_wait after its first parking,
-- then about as long again as it has been failing: 1h, 1h, 2h, 4h, ... up to p_max_wait.
CREATE OR REPLACE FUNCTION pgembed.requeue_parked(p_pipeline text, p_class text,
                                                  p_min_wait interval, p_max_wait interval)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    n bigint := 0;
BEGIN
    IF p_class IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pgembed.failure_classes c WHERE c.class = p_class) THEN
        RAISE EXCEPTION 'pgembed: no failure class %; the classes are %', p_class,
            (SELECT string_agg(c.class, ', ' ORDER BY c.class) FROM pgembed.failure_classes c)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR r IN
        WITH due AS (
            UPDATE pgembed.failures f SET parked_at = NULL, attempts = 0
              FROM pgembed.failure_classes c
             WHERE c.class = f.class AND f.parked_at IS NOT NULL
               AND (p_pipeline IS NULL OR f.pipeline = p_pipeline)
               AND (p_class IS NULL OR f.class = p_class)
               AND (p_min_wait IS NULL OR c.auto_retry AND f.parked_at
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

-- For a DBA (pgembed failures --retry [--class CLASS]): every parked failure (all pipelines,
-- or one; all classes, or one), now, e.g. SELECT pgembed.retry_failures(class => 'too_long')
-- once the model's limit or the pipeline's chunking is fixed.
-- (Its one-argument form, of 0001, goes first: a fresh init creates it in the same
-- transaction, where refresh.sql cannot tell it is stale, and a call with one argument
-- would find two functions.)
DROP FUNCTION IF EXISTS pgembed.retry_failures(text);
CREATE OR REPLACE FUNCTION pgembed.retry_failures(p_pipeline text DEFAULT NULL, class text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgembed.requeue_parked(p_pipeline, retry_failures.class, NULL, NULL) $$;

-- For the scheduled retry job: the parked failures that are due (see requeue_parked), of the
-- classes whose policy retries by itself.
CREATE OR REPLACE FUNCTION pgembed.retry_parked_failures(p_min_wait interval,
                                                         p_max_wait interval DEFAULT '7 days')
RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgembed.requeue_parked(NULL, NULL, p_min_wait, p_max_wait) $$;

-- Failures per pipeline and class, with the class's policy: what `pgembed failures` sums up.
CREATE OR REPLACE VIEW pgembed.failure_counts AS
SELECT f.pipeline, f.class,
       count(*) FILTER (WHERE f.parked_at IS NOT NULL) AS parked,
       count(*) FILTER (WHERE f.parked_at IS NULL) AS retrying,
       min(f.first_failed_at) AS first_failed_at,
       max(f.last_failed_at) AS last_failed_at,
       c.park_after, c.auto_retry
  FROM pgembed.failures f
  JOIN pgembed.failure_classes c ON c.class = f.class
 GROUP BY f.pipeline, f.class, c.park_after, c.auto_retry;
