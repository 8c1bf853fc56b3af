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
    best jsonb;
BEGIN
    SELECT * INTO p FROM pgembed.pipelines q WHERE q.name = pgembed.resolve_pipeline(search.pipeline);
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
    -- one read of the nearest chunks a round: their count says whether a larger read could
    -- name more rows, and the best chunk of each row comes from the same read
    LOOP
        PERFORM set_config('hnsw.ef_search', least(1000, greatest(40, wanted, k * coalesce(p.rerank, 0)))::text,
                           true);
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
        EXECUTE format(
            'WITH n AS MATERIALIZED (%s), '
            '     b AS (SELECT DISTINCT ON (n.key) n.* FROM n ORDER BY n.key, n.distance, n.chunk_seq) '
            'SELECT (SELECT count(*) FROM n), '
            '       coalesce((SELECT jsonb_agg(to_jsonb(t) ORDER BY t.distance, t.key) '
            '                   FROM (SELECT * FROM b ORDER BY b.distance, b.key LIMIT $3) AS t), ''[]'')',
            nearest)
            INTO chunks, best USING query, wanted, k;
        EXIT WHEN jsonb_array_length(best) >= k OR chunks < wanted;
        wanted := wanted * 4;
    END LOOP;
    RETURN QUERY SELECT b.key, b.chunk_seq, b.chunk, b.distance
                   FROM jsonb_to_recordset(best) AS b(key jsonb, chunk_seq int, chunk text, distance float8)
                  ORDER BY b.distance, b.key;
END
$$;

-- The `wanted` ($2) nearest chunks of a pipeline to the query ($1), by the pipeline's
-- distance, through its vector index when it has one (ORDER BY the index's expression, LIMIT).
-- The query is cast to the pipeline's storage (a halfvec index orders by halfvec distances).
-- A binary-quantized pipeline reads `rerank` times as many candidates as rows asked for ($3),
-- and never fewer than `wanted`, by Hamming distance through its index of bits, then keeps
-- the nearest by the stored vectors: the distance returned is always the stored vectors' own.
CREATE OR REPLACE FUNCTION pgembed.nearest_chunks_sql(p pgembed.pipelines)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p.quantization = 'binary' THEN format(
               'SELECT c.key, c.chunk_seq, c.chunk, (c.embedding %1$s $1::%2$s)::float8 AS distance FROM ('
               'SELECT jsonb_build_object(%3$s) AS key, d.chunk_seq, d.chunk, d.embedding FROM pgembed.%4$I d '
               'ORDER BY %5$s OPERATOR(%6$s.<~>) %7$s LIMIT greatest($2, $3 * %8$s)) AS c '
               'ORDER BY c.embedding %1$s $1::%2$s LIMIT $2',
               o.op, pgembed.embedding_type(p), pgembed.sql_list('%1$L, d.%1$I', p.key_columns), p.destination,
               pgembed.index_expression(p, 'd.embedding'), pgembed.vector_schema(),
               pgembed.index_expression(p, '$1::' || pgembed.embedding_type(p)), p.rerank)
           ELSE format(
               'SELECT jsonb_build_object(%1$s) AS key, d.chunk_seq, d.chunk, '
               '(d.embedding %2$s $1::%3$s)::float8 AS distance '
               'FROM pgembed.%4$I d ORDER BY d.embedding %2$s $1::%3$s LIMIT $2',
               pgembed.sql_list('%1$L, d.%1$I', p.key_columns), o.op, pgembed.embedding_type(p), p.destination)
           END
      FROM (SELECT format('OPERATOR(%s.%s)', pgembed.vector_schema(),
                          CASE p.distance WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' ELSE '<#>' END) AS op) AS o
$$;
