-- pgembed cost and cache views. Re-runnable: CREATE OR REPLACE.

-- What the embeddings cost, per day, pipeline and purpose. Spend uses today's price in
-- pgembed.models, so a corrected price corrects history too.
CREATE OR REPLACE VIEW pgembed.cost_daily AS
SELECT date_trunc('day', u.at)::date AS day,
       u.pipeline,
       u.model,
       u.purpose,
       sum(u.requests) AS requests,
       sum(u.inputs) AS inputs,
       sum(u.tokens) AS tokens,
       sum(u.cache_hits) AS cache_hits,
       round(sum(u.tokens) * coalesce(max(m.usd_per_1m_tokens), 0) / 1000000, 6) AS usd
FROM pgembed.usage u
LEFT JOIN pgembed.models m ON m.model = u.model
GROUP BY 1, 2, 3, 4;

CREATE OR REPLACE VIEW pgembed.cache_stats AS
SELECT c.model,
       c.dimensions,
       count(*) AS entries,
       pg_size_pretty(sum(pg_column_size(c.embedding))) AS vector_bytes,
       min(c.created_at) AS oldest,
       max(c.last_used_at) AS last_used
FROM pgembed.embedding_cache c
GROUP BY 1, 2;
