-- pgembed evaluation: sets of queries with judged rows, and the runs that measured a
-- pipeline (or the pipeline behind an alias) on them. `pgembed eval import` reads the files
-- (pgembed/evaluation/sets.py) and hands the whole set to import_eval_set, which writes it
-- or nothing; `pgembed eval run` searches through pgembed.search and stores one eval_runs
-- row (pgembed/evaluation/runs.py).

-- A judged key as pgembed.search returns it (a JSON object of the table's primary key
-- columns, typed as the table has them), from what a file gave: that object, or for a
-- one-column key the bare value ("42" and 42 alike). NULL when no row has that key.
CREATE OR REPLACE FUNCTION pgembed.eval_set_key(p_source regclass, p_columns name[], p_key jsonb)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted jsonb := CASE WHEN jsonb_typeof(p_key) = 'object' THEN p_key
                         WHEN cardinality(p_columns) = 1 AND jsonb_typeof(p_key) IN ('string', 'number')
                              THEN jsonb_build_object(p_columns[1], p_key) END;
    found jsonb;
BEGIN
    IF wanted IS NULL OR (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(wanted) k)
                         IS DISTINCT FROM (SELECT array_agg(c::text ORDER BY c) FROM unnest(p_columns) c) THEN
        RETURN NULL;
    END IF;
    BEGIN
        EXECUTE format('SELECT jsonb_build_object(%s) FROM %s s, jsonb_populate_record(NULL::%s, $1) r WHERE %s',
                       pgembed.sql_list('%1$L, s.%1$I', p_columns), p_source, p_source,
                       pgembed.sql_list('s.%1$I = r.%1$I', p_columns, ' AND '))
            INTO found USING wanted;
    EXCEPTION WHEN data_exception THEN
        RETURN NULL;  -- a value the key column cannot hold ('abc' for an int): no such row
    END;
    RETURN found;
END
$$;

-- Writes a whole evaluation set, or nothing: every judged key must name a row of p_source
-- (the unknown ones are listed), and no query may judge one row twice.
--   p_queries:   [{"id": text, "query": text}, ...]
--   p_judgments: [{"query_id": text, "key": <primary key>, "relevance": int}, ...]
CREATE OR REPLACE FUNCTION pgembed.import_eval_set(p_name text, p_source regclass, p_origin text,
                                                   p_queries jsonb, p_judgments jsonb,
                                                   p_replace boolean DEFAULT false)
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pk record;
    unknown text[];
    unknown_count int;
    twice text;
    n int;
BEGIN
    IF p_name IS NULL OR p_name !~ '[^[:space:]]' THEN
        RAISE EXCEPTION 'pgembed: an evaluation set needs a name'
            USING HINT = 'pgembed eval import NAME ...';
    END IF;
    pk := pgembed.primary_key(p_source);
    IF pk.columns IS NULL THEN
        RAISE EXCEPTION 'pgembed: table % has no primary key, which the judgments would name', p_source
            USING HINT = 'Judgments name rows by their primary key, as pgembed.search returns them.';
    END IF;
    IF EXISTS (SELECT 1 FROM pgembed.eval_sets s WHERE s.name = p_name) THEN
        IF NOT p_replace THEN
            RAISE EXCEPTION 'pgembed: an evaluation set named % exists already', quote_literal(p_name)
                USING HINT = 'Import it under another name, or replace it (--replace): its runs go with it.';
        END IF;
        DELETE FROM pgembed.eval_sets s WHERE s.name = p_name;
    END IF;
    IF coalesce(jsonb_array_length(p_queries), 0) = 0 THEN
        RAISE EXCEPTION 'pgembed: evaluation set % has no queries', quote_literal(p_name)
            USING HINT = 'Every query needs at least one relevant key.';
    END IF;

    CREATE TEMP TABLE pg_temp.eval_import ON COMMIT DROP AS
    SELECT j->>'query_id' AS query_id, j->'key' AS given, (j->>'relevance')::int AS relevance,
           pgembed.eval_set_key(p_source, pk.columns, j->'key') AS key
      FROM jsonb_array_elements(p_judgments) j;

    SELECT (array_agg(DISTINCT i.given::text))[1:10], count(DISTINCT i.given) INTO unknown, unknown_count
      FROM pg_temp.eval_import i WHERE i.key IS NULL;
    IF unknown_count > 0 THEN
        RAISE EXCEPTION 'pgembed: % judged key(s) name no row of %: %', unknown_count, p_source,
            array_to_string(unknown, ', ') || CASE WHEN unknown_count > 10 THEN ', ...' ELSE '' END
            USING HINT = format('Keys are the primary key of %s (%s), as a value or a JSON object; nothing was imported.',
                                p_source, array_to_string(pk.columns, ', '));
    END IF;
    SELECT format('query %s judges row %s more than once', quote_literal(i.query_id), i.key) INTO twice
      FROM pg_temp.eval_import i GROUP BY i.query_id, i.key HAVING count(*) > 1 ORDER BY i.query_id LIMIT 1;
    IF twice IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: %', twice
            USING HINT = 'Each row is judged once per query; nothing was imported.';
    END IF;

    INSERT INTO pgembed.eval_sets (name, source, origin) VALUES (p_name, p_source, p_origin);
    INSERT INTO pgembed.eval_queries (eval_set, query_id, query)
    SELECT p_name, q->>'id', q->>'query' FROM jsonb_array_elements(p_queries) q;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO pgembed.eval_judgments (eval_set, query_id, key, relevance)
    SELECT p_name, i.query_id, i.key, i.relevance FROM pg_temp.eval_import i;
    DROP TABLE pg_temp.eval_import;  -- a second import in this transaction makes its own
    RETURN n;
END
$$;

-- The evaluation sets, with what they hold.
CREATE OR REPLACE VIEW pgembed.eval_set_summary AS
SELECT s.name, s.source::text AS source, s.origin,
       (SELECT count(*) FROM pgembed.eval_queries q WHERE q.eval_set = s.name) AS queries,
       (SELECT count(*) FILTER (WHERE j.relevance > 0) FROM pgembed.eval_judgments j
         WHERE j.eval_set = s.name) AS relevant,
       (SELECT count(*) FILTER (WHERE j.relevance = 0) FROM pgembed.eval_judgments j
         WHERE j.eval_set = s.name) AS irrelevant,
       s.imported_at, s.imported_by
  FROM pgembed.eval_sets s;

-- Every run, oldest first per target and set, with the change in nDCG@10 since the run
-- before it on the same target and set: the trend of one alias across its repoints, or of
-- one pipeline.
CREATE OR REPLACE VIEW pgembed.eval_history AS
SELECT r.id, r.at, r.target, r.pipeline, r.model, r.eval_set,
       (r.metrics->>'ndcg@10')::float8 AS ndcg_10,
       (r.metrics->>'recall@10')::float8 AS recall_10,
       (r.metrics->>'mrr@10')::float8 AS mrr_10,
       (r.metrics->>'ndcg@10')::float8
         - lag((r.metrics->>'ndcg@10')::float8) OVER w AS ndcg_10_change,
       r.metrics, r.queries, r.query_tokens, r.cost_center, r.seconds, r.scheduled, r.run_by,
       -- what the query embeddings cost at the model's current price (as the cost views count)
       r.query_tokens * m.usd_per_1m_tokens / 1e6 AS query_usd
  FROM pgembed.eval_runs r
  LEFT JOIN pgembed.models m ON m.model = r.model
WINDOW w AS (PARTITION BY r.target, r.eval_set ORDER BY r.at, r.id);

-- Runs whose nDCG@10 fell below the run before them by more than the threshold: the
-- alias's own (pgembed.set_alias_evaluation) when the target is an alias, else 0.02.
CREATE OR REPLACE VIEW pgembed.eval_regressions AS
SELECT h.id, h.at, h.target, h.pipeline, h.model, h.eval_set, h.ndcg_10,
       h.ndcg_10 - h.ndcg_10_change AS previous_ndcg_10, h.ndcg_10_change,
       coalesce(a.regression_threshold, 0.02) AS threshold, h.scheduled
  FROM pgembed.eval_history h
  LEFT JOIN pgembed.aliases a ON a.name = h.target
 WHERE h.ndcg_10_change < -coalesce(a.regression_threshold, 0.02);
