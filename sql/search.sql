-- pgembed search: nearest rows, not nearest chunks.
--
-- A row cut into many chunks would otherwise fill the k results with itself, and a plain
-- LIMIT k over an HNSW index returns fewer than k once rows are grouped. So the nearest
-- chunks are read k * 4 at a time (more while they name fewer than k rows), with
-- hnsw.ef_search raised to the number asked for and pgvector's iterative index scans on
-- (relaxed_order: the scan goes on past ef_search until the LIMIT is met), and each row
-- keeps its best chunk. Python's search, the Client and `pgembed search` all come here.

-- The nearest chunks of one pipeline to `query`, best per row: the row's key as a JSON
-- object of its key columns, the chunk that matched and its distance, best first.
CREATE OR REPLACE FUNCTION pgembed.search(pipeline text, query real[], k int DEFAULT 10)
RETURNS TABLE (key jsonb, chunk_seq int, chunk text, distance double precision)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    nearest text;
    wanted bigint;
    chunks bigint;
    keys bigint;
BEGIN
    SELECT * INTO p FROM pgembed.pipelines q WHERE q.name = search.pipeline;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgembed: no pipeline named %', coalesce(quote_literal(search.pipeline), 'NULL')
            USING HINT = 'pgembed pipeline list shows the pipelines.';
    END IF;
    IF k IS NULL OR k < 1 THEN
        RAISE EXCEPTION 'pgembed: k must be 1 or more, not %', coalesce(k::text, 'NULL')
            USING HINT = 'k is how many rows come back.';
    END IF;
    IF coalesce(cardinality(query), 0) <> p.dimensions THEN
        RAISE EXCEPTION 'pgembed: pipeline % holds vectors of % dimensions, the query has %',
            quote_literal(p.name), p.dimensions, coalesce(cardinality(query), 0)
            USING HINT = 'Embed the query with the pipeline''s model and dimensions.';
    END IF;
    nearest := pgembed.nearest_chunks_sql(p);
    wanted := k * 4;
    LOOP
        PERFORM set_config('hnsw.ef_search', least(1000, greatest(40, wanted))::text, true);
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
        EXECUTE format('SELECT count(*), count(DISTINCT n.key) FROM (%s) AS n', nearest)
            INTO chunks, keys USING query, wanted;
        EXIT WHEN keys >= k OR chunks < wanted;
        wanted := wanted * 4;
    END LOOP;
    RETURN QUERY EXECUTE format(
        'SELECT b.key, b.chunk_seq, b.chunk, b.distance FROM ('
        '  SELECT DISTINCT ON (n.key) n.* FROM (%s) AS n ORDER BY n.key, n.distance, n.chunk_seq) AS b '
        'ORDER BY b.distance, b.key LIMIT $3', nearest)
        USING query, wanted, k;
END
$$;

-- The `wanted` ($2) nearest chunks of a pipeline to the query ($1), by the pipeline's
-- distance, through its vector index when it has one (ORDER BY the operator, LIMIT).
CREATE OR REPLACE FUNCTION pgembed.nearest_chunks_sql(p pgembed.pipelines)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('SELECT jsonb_build_object(%1$s) AS key, d.chunk_seq, d.chunk, '
                  '(d.embedding %2$s $1::%3$s.vector)::float8 AS distance '
                  'FROM pgembed.%4$I d ORDER BY d.embedding %2$s $1::%3$s.vector LIMIT $2',
                  pgembed.sql_list('%1$L, d.%1$I', p.key_columns),
                  format('OPERATOR(%s.%s)', pgembed.vector_schema(),
                         CASE p.distance WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' ELSE '<#>' END),
                  pgembed.vector_schema(), p.destination)
$$;
