-- pgembed costs: what embeddings cost, for what and for whom, and what the cache saved.
-- Re-runnable: CREATE OR REPLACE only.
--
-- Source of truth: pgembed.usage, one row per finished batch (worker) or query embedding
-- (search, the gateway), split by purpose, cost center and the caller's source, user and
-- task. Tokens there are what the provider billed.
--
-- Spend is never stored: every view prices tokens with the CURRENT
-- pgembed.models.usd_per_1m_tokens, times the row's price_factor (the share of the list
-- price it was billed at: 0.5 for the Batch API), so a DBA's price edit
--     UPDATE pgembed.models SET usd_per_1m_tokens = 0.02 WHERE model = 'openai:text-embedding-3-small';
-- re-prices history at once. Models without a row (hash:N) and local models cost 0.
--
-- Days are calendar days in the session's TimeZone (SET TimeZone = 'Europe/Paris' before
-- querying to see another office's days). "Today" is the day so far, not 24 hours.

-- Every usage row with its price and spend. The other views aggregate this one; query it
-- directly for a custom period:
--     SELECT cost_center, sum(usd) FROM pgembed.usage_cost
--      WHERE at >= date '2026-11-01' AND at < date '2026-12-01' GROUP BY 1;
-- usd = tokens × usd_per_1m_tokens × 0.000001 × price_factor: multiplications, so exact.
--
-- source is what the caller said (user_query, note_index, reindex...); a row without one
-- is labelled with its purpose: the worker's batches are 'backfill', 'sync', 'repair',
-- 'retry' or 'migration', a search nobody attributed is 'query'. So every row has a source
-- and a worker's reindex (repair, migration) is told apart from its daily sync.
-- work is what the spend was for: 'query' (purpose query: embedding a search) or
-- 'indexing' (every other purpose: the worker's, and the gateway's 'index', documents an
-- application embeds for its own index).
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
       u.tokens * coalesce(m.usd_per_1m_tokens, 0) * 0.000001 * u.price_factor AS usd,
       coalesce(u.source, u.purpose) AS source,
       u.app_user,
       u.task,
       u.price_factor,
       CASE WHEN u.purpose = 'query' THEN 'query' ELSE 'indexing' END AS work
FROM pgembed.usage u
LEFT JOIN pgembed.models m ON m.model = u.model;

COMMENT ON VIEW pgembed.usage_cost IS
    'pgembed.usage rows priced at the current pgembed.models price times price_factor (usd).';

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

-- The runaway reindex, found by two keys: (pipeline, purpose) and (source, task). A key
-- is flagged when its spend today is far above its daily average over the 7 previous days
-- (days without usage count as 0).
-- Spend is measured in usd when the model has a price; when it is free (local, hash, or a
-- price left at 0) it is measured in tokens, so a free model's runaway still shows.
-- Flagged when today > p_ratio × average AND today > the floor (p_min_usd, or
-- p_min_tokens for free models): the floor keeps small absolute noise quiet. A key with
-- no history at all and spend above the floor is flagged too, with ratio NULL (a new
-- backfill is worth a look). measure says which unit today / daily_avg_7d are in.
-- p_by 'pipeline': key_a = pipeline, key_b = purpose; 'source': key_a = source (labelled as
-- in usage_cost), key_b = task. The two functions below name the columns.
CREATE OR REPLACE FUNCTION pgembed.cost_anomalies_by(
    p_by         text,
    p_ratio      numeric,
    p_min_usd    numeric,
    p_min_tokens bigint)
RETURNS TABLE (key_a text, key_b text, measure text, today numeric,
               daily_avg_7d numeric, ratio numeric, today_tokens bigint, today_usd numeric)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
WITH keyed AS (
    SELECT CASE p_by WHEN 'pipeline' THEN c.pipeline WHEN 'source' THEN c.source END AS a,
           CASE p_by WHEN 'pipeline' THEN c.purpose WHEN 'source' THEN c.task END AS b,
           c.at, c.tokens, c.usd, c.usd_per_1m_tokens
      FROM pgembed.usage_cost c
     WHERE c.at >= current_date - 7
), today AS (
    SELECT k.a, k.b, sum(k.tokens)::bigint AS tokens, sum(k.usd) AS usd,
           max(k.usd_per_1m_tokens) > 0 AS priced
      FROM keyed k
     WHERE k.at >= current_date
     GROUP BY k.a, k.b
), week AS (
    SELECT k.a, k.b, sum(k.tokens) / 7.0 AS tokens, sum(k.usd) / 7.0 AS usd
      FROM keyed k
     WHERE k.at < current_date
     GROUP BY k.a, k.b
), measured AS (
    SELECT t.a, t.b, t.tokens AS today_tokens, t.usd AS today_usd,
           CASE WHEN t.priced THEN 'usd' ELSE 'tokens' END AS measure,
           CASE WHEN t.priced THEN t.usd ELSE t.tokens END AS today,
           coalesce(CASE WHEN t.priced THEN w.usd ELSE w.tokens END, 0) AS average,
           CASE WHEN t.priced THEN p_min_usd ELSE p_min_tokens END AS floor
      FROM today t
      LEFT JOIN week w ON w.a IS NOT DISTINCT FROM t.a AND w.b IS NOT DISTINCT FROM t.b
)
SELECT m.a, m.b, m.measure, m.today, round(m.average, 6),
       round(m.today / nullif(m.average, 0), 2), m.today_tokens, m.today_usd
  FROM measured m
 WHERE p_by IN ('pipeline', 'source') AND m.today > m.floor AND m.today > p_ratio * m.average
 ORDER BY m.today_usd DESC, m.today_tokens DESC
$$;

COMMENT ON FUNCTION pgembed.cost_anomalies_by(text, numeric, numeric, bigint) IS
    'Keys (pipeline/purpose or source/task) spending today far above their 7-day daily average.';

-- By pipeline and purpose:
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
SELECT * FROM pgembed.cost_anomalies_by('pipeline', p_ratio, p_min_usd, p_min_tokens)
$$;

COMMENT ON FUNCTION pgembed.find_cost_anomalies(numeric, numeric, bigint) IS
    'Pipeline/purpose pairs spending today far above their 7-day daily average.';

-- By source and task: a `reindex` source, or a model migration's backfill, far above its
-- usual, even when it shares its pipeline and purpose with the daily traffic.
--     SELECT * FROM pgembed.find_source_anomalies(p_ratio => 5);
CREATE OR REPLACE FUNCTION pgembed.find_source_anomalies(
    p_ratio      numeric DEFAULT 3,
    p_min_usd    numeric DEFAULT 1,
    p_min_tokens bigint DEFAULT 1000000)
RETURNS TABLE (source text, task text, measure text, today numeric,
               daily_avg_7d numeric, ratio numeric, today_tokens bigint, today_usd numeric)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
SELECT * FROM pgembed.cost_anomalies_by('source', p_ratio, p_min_usd, p_min_tokens)
$$;

COMMENT ON FUNCTION pgembed.find_source_anomalies(numeric, numeric, bigint) IS
    'Source/task pairs spending today far above their 7-day daily average.';

-- The same with the default thresholds: more than 3× the 7-day daily average and more
-- than $1 today (or 1,000,000 tokens for a free model).
CREATE OR REPLACE VIEW pgembed.cost_anomalies AS
SELECT * FROM pgembed.find_cost_anomalies();

COMMENT ON VIEW pgembed.cost_anomalies IS
    'Spend today above 3x the 7-day daily average and above $1 (1M tokens when free).';

CREATE OR REPLACE VIEW pgembed.cost_source_anomalies AS
SELECT * FROM pgembed.find_source_anomalies();

COMMENT ON VIEW pgembed.cost_source_anomalies IS
    'Source/task spend today above 3x the 7-day daily average and above $1 (1M tokens when free).';

-- Per day: what share of spend and tokens went to indexing and what to queries (work, as
-- in usage_cost: 'indexing' is the worker's purposes and the gateway's 'index'). One row
-- per day and work; usd_share is NULL on a day that cost nothing (free models: read
-- token_share).
--     SELECT day, work, tokens, usd, usd_share FROM pgembed.cost_share_daily
--      WHERE day > current_date - 7 ORDER BY day, work;
CREATE OR REPLACE VIEW pgembed.cost_share_daily AS
WITH per_work AS (
    SELECT c.day, c.work,
           sum(c.requests)::bigint AS requests,
           sum(c.tokens)::bigint AS tokens,
           sum(c.usd) AS usd
      FROM pgembed.usage_cost c
     GROUP BY c.day, c.work
)
SELECT p.day, p.work, p.requests, p.tokens, p.usd,
       round(p.tokens / nullif(sum(p.tokens) OVER (PARTITION BY p.day), 0), 4) AS token_share,
       round(p.usd / nullif(sum(p.usd) OVER (PARTITION BY p.day), 0), 4) AS usd_share
  FROM per_work p;

COMMENT ON VIEW pgembed.cost_share_daily IS
    'Per day: spend and tokens of indexing and of queries, and the share of each.';

-- Per day × user × task × source: who spent and on what. app_user and task are NULL where
-- the caller named none (the worker's batches, a search without attribution); source is
-- labelled as in usage_cost. rank_in_day ranks the day's users by spend (tokens break
-- ties, and rank free models), so the day's top 5:
--     SELECT day, app_user, tokens, usd FROM pgembed.cost_by_user
--      WHERE day = current_date AND rank_in_day <= 5 ORDER BY rank_in_day;
-- and over a period:
--     SELECT app_user, sum(usd) AS usd, sum(tokens) AS tokens FROM pgembed.cost_by_user
--      WHERE day > current_date - 30 GROUP BY 1 ORDER BY usd DESC, tokens DESC LIMIT 10;
CREATE OR REPLACE VIEW pgembed.cost_by_attribution AS
SELECT c.day, c.app_user, c.task, c.source, c.work,
       sum(c.requests)::bigint AS requests,
       sum(c.inputs)::bigint AS inputs,
       sum(c.tokens)::bigint AS tokens,
       sum(c.cache_hits)::bigint AS cache_hits,
       sum(c.cache_misses)::bigint AS cache_misses,
       sum(c.usd) AS usd
  FROM pgembed.usage_cost c
 GROUP BY c.day, c.app_user, c.task, c.source, c.work;

COMMENT ON VIEW pgembed.cost_by_attribution IS
    'Embedding usage and spend per day, user, task, source and work (current prices).';

CREATE OR REPLACE VIEW pgembed.cost_by_user AS
SELECT a.day, a.app_user, sum(a.requests)::bigint AS requests, sum(a.tokens)::bigint AS tokens,
       sum(a.usd) AS usd,
       rank() OVER (PARTITION BY a.day ORDER BY sum(a.usd) DESC, sum(a.tokens) DESC) AS rank_in_day
  FROM pgembed.cost_by_attribution a
 GROUP BY a.day, a.app_user;

COMMENT ON VIEW pgembed.cost_by_user IS
    'Spend per day and application user, ranked within the day (NULL: no user named).';

CREATE OR REPLACE VIEW pgembed.cost_by_task AS
SELECT a.day, a.task, sum(a.requests)::bigint AS requests, sum(a.tokens)::bigint AS tokens,
       sum(a.usd) AS usd,
       rank() OVER (PARTITION BY a.day ORDER BY sum(a.usd) DESC, sum(a.tokens) DESC) AS rank_in_day
  FROM pgembed.cost_by_attribution a
 GROUP BY a.day, a.task;

COMMENT ON VIEW pgembed.cost_by_task IS
    'Spend per day and task, ranked within the day (NULL: no task named).';

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
