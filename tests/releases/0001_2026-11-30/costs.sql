-- pgembed costs: what embeddings cost, for what and for whom, and what the cache saved.
-- Re-runnable: CREATE OR REPLACE only.
--
-- Source of truth: pgembed.usage, one row per finished batch (worker) or query embedding
-- (search), split by purpose and cost center. Tokens there are what the provider billed.
--
-- Spend is never stored: every view prices tokens with the CURRENT
-- pgembed.models.usd_per_1m_tokens, so a DBA's price edit
--     UPDATE pgembed.models SET usd_per_1m_tokens = 0.02 WHERE model = 'openai:text-embedding-3-small';
-- re-prices history at once. Models without a row (hash:N) and local models cost 0.
--
-- Days are calendar days in the session's TimeZone (SET TimeZone = 'Europe/Paris' before
-- querying to see another office's days). "Today" is the day so far, not 24 hours.

-- Every usage row with its price and spend. The other views aggregate this one; query it
-- directly for a custom period:
--     SELECT cost_center, sum(usd) FROM pgembed.usage_cost
--      WHERE at >= date '2026-11-01' AND at < date '2026-12-01' GROUP BY 1;
-- usd = tokens × usd_per_1m_tokens × 0.000001: a multiplication, so exact (12 decimals).
CREATE OR REPLACE VIEW pgembed.usage_cost AS
SELECT u.id,
       u.at,
       u.at::date AS day,
       u.pipeline,
       u.model,
       u.purpose,
       u.cost_center,
       u.requests,
       u.inputs,
       u.tokens,
       u.cache_hits,
       u.cache_misses,
       u.worker,
       coalesce(m.usd_per_1m_tokens, 0) AS usd_per_1m_tokens,
       u.tokens * coalesce(m.usd_per_1m_tokens, 0) * 0.000001 AS usd
FROM pgembed.usage u
LEFT JOIN pgembed.models m ON m.model = u.model;

COMMENT ON VIEW pgembed.usage_cost IS
    'pgembed.usage rows priced at the current pgembed.models price (usd).';

-- Per day × pipeline × model × purpose. pipeline is NULL for query embeddings made
-- without a pipeline. requests = HTTP calls to the provider (retries and bisection of a
-- rejected batch included); inputs = texts sent; cache_hits = texts the cache answered.
--     SELECT day, pipeline, purpose, tokens, usd FROM pgembed.cost_daily
--      WHERE day > current_date - 7 ORDER BY day, usd DESC;
CREATE OR REPLACE VIEW pgembed.cost_daily AS
SELECT c.day,
       c.pipeline,
       c.model,
       c.purpose,
       sum(c.requests)::bigint AS requests,
       sum(c.inputs)::bigint AS inputs,
       sum(c.tokens)::bigint AS tokens,
       sum(c.cache_hits)::bigint AS cache_hits,
       sum(c.cache_misses)::bigint AS cache_misses,
       sum(c.usd) AS usd
FROM pgembed.usage_cost c
GROUP BY c.day, c.pipeline, c.model, c.purpose;

COMMENT ON VIEW pgembed.cost_daily IS
    'Embedding usage and spend per day, pipeline, model and purpose (current prices).';

-- Per day × cost center × pipeline × purpose: who pays. A pipeline's cost center is its
-- cost_center expression evaluated on each row (e.g. tenant_id); a query embedding's is
-- the caller's (search(..., cost_center => ...)). NULL = nobody named: a pipeline without
-- a cost_center expression, a row where it is NULL, or a query without one.
-- The day column keeps the period free; for a month per cost center:
--     SELECT cost_center, sum(tokens) AS tokens, sum(usd) AS usd
--       FROM pgembed.cost_by_cost_center
--      WHERE day >= date_trunc('month', current_date) GROUP BY 1 ORDER BY usd DESC;
-- A batch's tokens are split between its cost centers in proportion to their texts'
-- token counts, so each day's cost centers add up to what the provider billed.
CREATE OR REPLACE VIEW pgembed.cost_by_cost_center AS
SELECT c.day,
       c.cost_center,
       c.pipeline,
       c.purpose,
       sum(c.requests)::bigint AS requests,
       sum(c.inputs)::bigint AS inputs,
       sum(c.tokens)::bigint AS tokens,
       sum(c.cache_hits)::bigint AS cache_hits,
       sum(c.cache_misses)::bigint AS cache_misses,
       sum(c.usd) AS usd
FROM pgembed.usage_cost c
GROUP BY c.day, c.cost_center, c.pipeline, c.purpose;

COMMENT ON VIEW pgembed.cost_by_cost_center IS
    'Embedding usage and spend per day, cost center, pipeline and purpose (current prices).';

-- The runaway reindex: (pipeline, purpose) pairs whose spend today is far above their
-- daily average over the 7 previous days (days without usage count as 0).
-- Spend is measured in usd when the model has a price; when it is free (local, hash, or a
-- price left at 0) it is measured in tokens, so a free model's runaway still shows.
-- Flagged when today > p_ratio × average AND today > the floor (p_min_usd, or
-- p_min_tokens for free models): the floor keeps small absolute noise quiet. A pair with
-- no history at all and spend above the floor is flagged too, with ratio NULL (a new
-- backfill is worth a look). measure says which unit today / daily_avg_7d are in.
--     SELECT * FROM pgembed.find_cost_anomalies(p_ratio => 5, p_min_usd => 10);
CREATE OR REPLACE FUNCTION pgembed.find_cost_anomalies(
    p_ratio      numeric DEFAULT 3,
    p_min_usd    numeric DEFAULT 1,
    p_min_tokens bigint DEFAULT 1000000)
RETURNS TABLE (pipeline text, purpose text, measure text, today numeric,
               daily_avg_7d numeric, ratio numeric, today_tokens bigint, today_usd numeric)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
WITH today AS (
    SELECT c.pipeline, c.purpose, sum(c.tokens)::bigint AS tokens, sum(c.usd) AS usd,
           max(c.usd_per_1m_tokens) > 0 AS priced
      FROM pgembed.usage_cost c
     WHERE c.at >= current_date
     GROUP BY c.pipeline, c.purpose
), week AS (
    SELECT c.pipeline, c.purpose, sum(c.tokens) / 7.0 AS tokens, sum(c.usd) / 7.0 AS usd
      FROM pgembed.usage_cost c
     WHERE c.at >= current_date - 7 AND c.at < current_date
     GROUP BY c.pipeline, c.purpose
), measured AS (
    SELECT t.pipeline, t.purpose, t.tokens AS today_tokens, t.usd AS today_usd,
           CASE WHEN t.priced THEN 'usd' ELSE 'tokens' END AS measure,
           CASE WHEN t.priced THEN t.usd ELSE t.tokens END AS today,
           coalesce(CASE WHEN t.priced THEN w.usd ELSE w.tokens END, 0) AS average,
           CASE WHEN t.priced THEN p_min_usd ELSE p_min_tokens END AS floor
      FROM today t
      LEFT JOIN week w ON w.pipeline IS NOT DISTINCT FROM t.pipeline AND w.purpose = t.purpose
)
SELECT m.pipeline, m.purpose, m.measure, m.today, round(m.average, 6),
       round(m.today / nullif(m.average, 0), 2), m.today_tokens, m.today_usd
  FROM measured m
 WHERE m.today > m.floor AND m.today > p_ratio * m.average
 ORDER BY m.today_usd DESC, m.today_tokens DESC
$$;

COMMENT ON FUNCTION pgembed.find_cost_anomalies(numeric, numeric, bigint) IS
    'Pipeline/purpose pairs spending today far above their 7-day daily average.';

-- The same with the default thresholds: more than 3× the 7-day daily average and more
-- than $1 today (or 1,000,000 tokens for a free model).
CREATE OR REPLACE VIEW pgembed.cost_anomalies AS
SELECT * FROM pgembed.find_cost_anomalies();

COMMENT ON VIEW pgembed.cost_anomalies IS
    'Spend today above 3x the 7-day daily average and above $1 (1M tokens when free).';

-- Per model: what the cache holds and what it saved.
--   entries, dimensions, vector_bytes, oldest, last_used: the cache table itself
--     (one model may be cached at several dimensions);
--   cache_hits, cache_misses, hit_rate: from pgembed.usage, all time (a hit is a text
--     that was needed and found in the cache, or already asked for in the same batch);
--   tokens_saved ≈ cache_hits × average tokens of a cached entry of that model (or, when
--     the cache holds none any more, the average tokens billed per miss);
--   usd_saved = tokens_saved at the model's current price.
CREATE OR REPLACE VIEW pgembed.cache_stats AS
WITH cached AS (
    SELECT e.model,
           array_agg(DISTINCT e.dimensions ORDER BY e.dimensions) AS dimensions,
           count(*) AS entries,
           sum(pg_column_size(e.embedding)) AS vector_bytes,
           avg(e.tokens) AS avg_tokens,
           min(e.created_at) AS oldest,
           max(e.last_used_at) AS last_used
      FROM pgembed.embedding_cache e
     GROUP BY e.model
), used AS (
    SELECT u.model,
           sum(u.cache_hits)::bigint AS cache_hits,
           sum(u.cache_misses)::bigint AS cache_misses,
           sum(u.tokens)::numeric / nullif(sum(u.cache_misses), 0) AS tokens_per_miss
      FROM pgembed.usage u
     GROUP BY u.model
), joined AS (
    SELECT coalesce(c.model, u.model) AS model, c.dimensions,
           coalesce(c.entries, 0) AS entries, c.vector_bytes, c.oldest, c.last_used,
           coalesce(u.cache_hits, 0) AS cache_hits, coalesce(u.cache_misses, 0) AS cache_misses,
           round(coalesce(u.cache_hits, 0) * coalesce(c.avg_tokens, u.tokens_per_miss, 0))::bigint
               AS tokens_saved
      FROM cached c
      FULL JOIN used u ON u.model = c.model
)
SELECT j.model,
       j.dimensions,
       j.entries,
       pg_size_pretty(j.vector_bytes) AS vector_bytes,
       j.oldest,
       j.last_used,
       j.cache_hits,
       j.cache_misses,
       round(j.cache_hits::numeric / nullif(j.cache_hits + j.cache_misses, 0), 4) AS hit_rate,
       j.tokens_saved,
       j.tokens_saved * coalesce(m.usd_per_1m_tokens, 0) * 0.000001 AS usd_saved
FROM joined j
LEFT JOIN pgembed.models m ON m.model = j.model;

COMMENT ON VIEW pgembed.cache_stats IS
    'Per model: cache entries, hit rate (from pgembed.usage), tokens and usd the cache saved.';
