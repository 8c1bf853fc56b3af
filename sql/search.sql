-- pgembed search: nearest rows, not nearest chunks.
--
-- A row cut into many chunks would otherwise fill the k results with itself, and a plain
-- LIMIT k over an HNSW index returns fewer than k once rows are grouped. So the nearest
-- chunks are read k * 4 at a time (more while they name fewer than k rows), with
-- hnsw.ef_search raised to the number asked for (ivfflat.probes from the index's lists and
-- rows) and pgvector's iterative index scans on (relaxed_order: the scan
-- goes on past ef_search or the probes until the LIMIT is met), and each row keeps its best
-- chunk. Python's search, the Client and `pgembed search` all come here.
--
-- A filter is equality on the source's columns: the chunks are read joined to the source
-- (the key), with the caller's rights, so the source's row-level security applies; the
-- iterative scan goes on until k rows pass. A source with row-level security is joined
-- even without a filter. A pipeline whose index is not built yet (deferred for its
-- backfill, or an IVFFlat waiting for its rows, or dropped) has no index to read: the
-- search is exact. Without a filter or row-level security the reads are the pipeline's
-- generated search (pgembed.generate_search_function in pipelines.sql), the same SQL kept
-- planned by the session.

-- Before 0006: no filter.
DROP FUNCTION IF EXISTS pgembed.search(text, real[], int);
DROP FUNCTION IF EXISTS pgembed.nearest_chunks_sql(pgembed.pipelines);

-- The nearest chunks of one pipeline to `query`, best per row: the row's key as a JSON
-- object of its key columns, the chunk that matched and its distance, best first. `filter`
-- (a JSON object, column => value, or => array of values for IN) keeps the rows whose
-- source columns equal it.
-- The index settings it picks (hnsw.*, ivfflat.*) hold for its reads only: it puts back
-- the caller's values before it returns (the session's, when the caller had set none), so
-- the rest of the caller's transaction keeps its own ef_search and probes. (A SET clause
-- would do it too, but a role that is not a superuser may not make one for pgvector's
-- settings before the library is loaded.)
CREATE OR REPLACE FUNCTION pgembed.search(pipeline text, query real[], k int DEFAULT 10, filter jsonb DEFAULT NULL)
RETURNS TABLE (key jsonb, chunk_seq int, chunk text, distance double precision)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    exact boolean;
    lists int;
    trained bigint;
    nearest text;
    wanted bigint;
    r record;
    keys jsonb[];
    seqs int[];
    chunks text[];
    distances float8[];
    read bigint;
    rls boolean;
    source_filter text;
    answered bigint;
    first boolean;
    single boolean;
    chunks_per_row float8;
    -- the caller's index settings, put back before it returns (NULL: pgvector was not loaded
    -- yet, so the caller had none); plain expressions, not a query: every search runs them
    callers text[] := ARRAY[current_setting('hnsw.ef_search', true), current_setting('hnsw.iterative_scan', true),
                            current_setting('ivfflat.probes', true), current_setting('ivfflat.iterative_scan', true)];
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
    -- whether its index is built (valid) yet, and an IVFFlat index's lists and rows, read
    -- from the catalog: a caller needs no grant on pgembed's bookkeeping to search. Only a
    -- binary-quantized pipeline reads otherwise without its index, and only IVFFlat has
    -- probes: any other reads the same SQL, which the planner runs as an exact scan when
    -- there is no valid index, so it skips the look-up.
    exact := false;
    IF p.index_type = 'ivfflat' OR p.quantization = 'binary' THEN
        SELECT ix.oid IS NULL, (SELECT split_part(o, '=', 2)::int FROM unnest(ix.reloptions) AS o WHERE o LIKE 'lists=%'),
               ix.reltuples::bigint
          INTO exact, lists, trained
          FROM (SELECT) AS one
          LEFT JOIN LATERAL (SELECT c.oid, c.reloptions, c.reltuples
                               FROM pg_catalog.pg_index i
                               JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
                               JOIN pg_catalog.pg_am am ON am.oid = c.relam
                              WHERE i.indrelid = format('pgembed.%I', p.destination)::regclass
                                AND am.amname = p.index_type AND i.indisvalid
                              ORDER BY c.oid DESC LIMIT 1) AS ix ON true;
    END IF;
    IF p.index_type = 'ivfflat' AND NOT exact THEN
        lists := coalesce(lists, 100);  -- pgvector's default
    END IF;
    -- The common case, no filter and no row-level security (false: the source exists and
    -- has none), is the pipeline's generated search (pgembed.generate_search_function): a
    -- plan kept by the session. Otherwise the SQL is written for this call.
    source_filter := CASE WHEN filter IS NOT NULL THEN pgembed.search_filter_sql(p, filter) END;
    -- and the destination's chunks per source row, as the last ANALYZE (or VACUUM) counted
    SELECT c.relrowsecurity, d.reltuples / nullif(greatest(c.reltuples, 0), 0) INTO rls, chunks_per_row
      FROM pg_catalog.pg_class c
      LEFT JOIN pg_catalog.pg_class d ON d.relname = p.destination AND d.relnamespace = 'pgembed'::regnamespace
                                     AND d.reltuples >= 0
     WHERE c.oid = p.source;
    IF source_filter IS NULL AND rls IS FALSE AND NOT (p.quantization = 'binary' AND exact) THEN
        nearest := format('SELECT * FROM pgembed.%I($1::%s, $2, $3)', 'p' || p.id || '_search',
                          pgembed.embedding_type(p));
    ELSE
        nearest := pgembed.best_chunk_per_row_sql(pgembed.nearest_chunks_sql(p, exact, source_filter));
    END IF;
    -- Rows of one chunk each (no chunking, one chunk kept, or as the catalog counts them):
    -- the first read asks the index for k + 1 chunks, in strict order (no iterative scan),
    -- out of the candidates a read of k * 4 would search (the same ef_search or probes), so
    -- the nearest k are the same. It is the answer if it names k + 1 rows and the last is
    -- farther than the k-th (no tie at the edge, which the reads below break by key); if
    -- not (a row of several chunks after all, dead rows, a small table), those reads follow.
    -- (A filtered read would rarely name k + 1 rows: it reads as it did.)
    single := p.quantization <> 'binary' AND source_filter IS NULL AND rls IS FALSE
              AND (p.chunking IN ('none', 'truncate') OR chunks_per_row <= 1);
    wanted := k * 4;
    first := true;
    LOOP
        PERFORM set_config('hnsw.ef_search', least(1000, greatest(40, wanted, k * coalesce(p.rerank, 0)))::text,
                           true);
        PERFORM set_config('hnsw.iterative_scan', CASE WHEN first AND single THEN 'off' ELSE 'relaxed_order' END,
                           true);
        IF lists IS NOT NULL THEN
            PERFORM set_config('ivfflat.probes', pgembed.ivfflat_probes(lists, greatest(trained, 1), wanted)::text,
                               true);
            PERFORM set_config('ivfflat.iterative_scan',
                               CASE WHEN first AND single THEN 'off' ELSE 'relaxed_order' END, true);
        END IF;
        IF first THEN
            -- the first read goes straight to the result when it is the answer (k rows, or
            -- all the table has), as most are: no rows collected, no second copy
            RETURN QUERY EXECUTE format(
                'WITH n AS (%s) SELECT n.key, n.chunk_seq, n.chunk, n.distance FROM n WHERE CASE WHEN $5 '
                'THEN (SELECT count(*) FROM n) > $6 AND (SELECT max(e.distance) FROM (SELECT n.distance FROM n '
                'ORDER BY n.distance, n.key LIMIT $6) AS e) < (SELECT max(n.distance) FROM n) '
                'ELSE (SELECT count(*) FROM n) >= $6 OR (SELECT coalesce(max(n.read), 0) FROM n) < $2 END '
                'ORDER BY n.distance, n.key LIMIT $6', nearest)
                USING query, CASE WHEN single THEN k + 1 ELSE wanted END, CASE WHEN single THEN k + 1 ELSE k END,
                      filter, single, k;
            GET DIAGNOSTICS answered = ROW_COUNT;
            EXIT WHEN answered > 0;
            first := false;
            CONTINUE WHEN single;  -- then the read of k * 4, in relaxed order
        ELSE
            keys := '{}';
            seqs := '{}';
            chunks := '{}';
            distances := '{}';
            read := 0;
            FOR r IN EXECUTE nearest USING query, wanted, k, filter LOOP
                keys := keys || r.key;
                seqs := seqs || r.chunk_seq;
                chunks := chunks || r.chunk;
                distances := distances || r.distance;
                read := r.read;
            END LOOP;
            EXIT WHEN cardinality(keys) >= k OR read < wanted;
        END IF;
        wanted := wanted * 4;
    END LOOP;
    -- the reads are done (RETURN QUERY ran its query): the caller's settings again, and the
    -- defaults where the caller had none (set_config of NULL is SET LOCAL ... TO DEFAULT;
    -- pg_settings, which builds every setting's row, cost a tenth of a search's time)
    PERFORM set_config('hnsw.ef_search', callers[1], true);
    PERFORM set_config('hnsw.iterative_scan', callers[2], true);
    IF lists IS NOT NULL THEN  -- only an IVFFlat search sets them
        PERFORM set_config('ivfflat.probes', callers[3], true);
        PERFORM set_config('ivfflat.iterative_scan', callers[4], true);
    END IF;
    RETURN QUERY SELECT * FROM unnest(keys, seqs, chunks, distances);
END
$$;

-- Each row's best chunk among the `nearest` ones (nearest_chunks_sql), best rows first, at
-- most $3 of them, and (on every row) how many chunks were read: fewer than wanted means
-- the table has no more, so a larger read could name no more rows. pgembed.search runs it,
-- and so does a pipeline's generated search (pipelines.sql).
CREATE OR REPLACE FUNCTION pgembed.best_chunk_per_row_sql(nearest text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('SELECT b.key, b.chunk_seq, b.chunk, b.distance, b.read FROM ('
                  'SELECT DISTINCT ON (n.key) n.*, count(*) OVER () AS read FROM (%s) AS n '
                  'ORDER BY n.key, n.distance, n.chunk_seq) AS b ORDER BY b.distance, b.key LIMIT $3', nearest)
$$;

-- How many IVFFlat lists a search of `wanted` chunks probes: the square root of the lists
-- (pgvector's guidance for recall), plus as many lists as `wanted` chunks fill on average
-- (rows / lists each, as the catalog counts the index's rows), and never more than all of them.
CREATE OR REPLACE FUNCTION pgembed.ivfflat_probes(lists int, trained bigint, wanted bigint)
RETURNS int
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT least(lists, ceil(sqrt(lists))::int + ceil(wanted::numeric * lists / greatest(trained, 1))::int)
$$;

-- The condition a search's filter puts on the source's row `s` (NULL: no filter): for each
-- key of the JSON object, its column equals the value ($4 ->> key, cast to the column's
-- type), or is one of an array's values, or IS NULL for JSON null. Only the names are
-- written into the SQL (quoted); the values stay in the parameter.
CREATE OR REPLACE FUNCTION pgembed.search_filter_sql(p pgembed.pipelines, filter jsonb)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    kv record;
    col record;
    terms text[] := '{}';
BEGIN
    IF filter IS NULL OR filter = '{}' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(filter) <> 'object' THEN
        RAISE EXCEPTION 'pgembed: a search filter is a JSON object of source columns and values, not %',
            left(filter::text, 60)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'e.g. filter => ''{"lang": "en", "year": [2019, 2020]}''';
    END IF;
    FOR kv IN SELECT e.key, e.value FROM jsonb_each(filter) AS e ORDER BY e.key LOOP
        SELECT a.attname, format_type(a.atttypid, NULL) AS type INTO col
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = p.source AND a.attname = kv.key AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'pgembed: pipeline % cannot filter on %: % has no such column',
                quote_literal(p.name), quote_ident(kv.key), p.source
                USING ERRCODE = 'undefined_column',
                      HINT = 'Filter on the columns of ' || p.source::text || ': '
                             || (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
                                   FROM pg_catalog.pg_attribute a
                                  WHERE a.attrelid = p.source AND a.attnum > 0 AND NOT a.attisdropped) || '.';
        END IF;
        IF jsonb_typeof(kv.value) = 'null' THEN
            terms := terms || format('s.%I IS NULL', col.attname);
        ELSIF jsonb_typeof(kv.value) = 'array' THEN
            IF EXISTS (SELECT 1 FROM jsonb_array_elements(kv.value) AS v
                        WHERE jsonb_typeof(v) IN ('array', 'object')) THEN
                RAISE EXCEPTION 'pgembed: the filter on % lists values, not %', quote_ident(kv.key),
                    left(kv.value::text, 60)
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'An array stands for IN: its items are strings, numbers or booleans.';
            END IF;
            terms := terms || format('s.%I = ANY (ARRAY(SELECT jsonb_array_elements_text($4 -> %L))::%s[])',
                                     col.attname, kv.key, col.type);
        ELSIF jsonb_typeof(kv.value) = 'object' THEN
            RAISE EXCEPTION 'pgembed: the filter on % is a value or an array of values, not an object (%)',
                quote_ident(kv.key), left(kv.value::text, 60)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Equality only: {"column": value} or {"column": [value, ...]} for IN.';
        ELSE
            terms := terms || format('s.%I = ($4 ->> %L)::%s', col.attname, kv.key, col.type);
        END IF;
    END LOOP;
    RETURN array_to_string(terms, ' AND ');
END
$$;

-- The `wanted` ($2) nearest chunks of a pipeline to the query ($1), by the pipeline's
-- distance, through its vector index when it has one (ORDER BY the index's expression, LIMIT).
-- The query is cast to the pipeline's storage (a halfvec index orders by halfvec distances).
-- A binary-quantized pipeline reads `rerank` times as many candidates as rows asked for ($3),
-- and never fewer than `wanted`, by Hamming distance through its index of bits, then keeps
-- the nearest by the stored vectors: the distance returned is always the stored vectors' own.
-- `exact` (its index is not built yet) orders by the stored vectors alone. `source_filter`
-- (pgembed.search_filter_sql, over the source's row `s` and the filter $4) keeps the
-- chunks whose source row passes it; a source with row-level security is always joined, so
-- that its policies decide for the caller which rows can come back.
CREATE OR REPLACE FUNCTION pgembed.nearest_chunks_sql(p pgembed.pipelines, exact boolean DEFAULT false,
                                                      source_filter text DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p.quantization = 'binary' AND NOT exact THEN format(
               'SELECT c.key, c.chunk_seq, c.chunk, (c.embedding %1$s $1::%2$s)::float8 AS distance FROM ('
               'SELECT jsonb_build_object(%3$s) AS key, d.chunk_seq, d.chunk, d.embedding FROM pgembed.%4$I d%9$s '
               'ORDER BY %5$s OPERATOR(%6$s.<~>) %7$s LIMIT greatest($2, $3 * %8$s)) AS c '
               'ORDER BY c.embedding %1$s $1::%2$s LIMIT $2',
               o.op, pgembed.embedding_type(p), pgembed.sql_list('%1$L, d.%1$I', p.key_columns), p.destination,
               pgembed.index_expression(p, 'd.embedding'), pgembed.vector_schema(),
               pgembed.index_expression(p, '$1::' || pgembed.embedding_type(p)), p.rerank, j.cond)
           ELSE format(
               'SELECT jsonb_build_object(%1$s) AS key, d.chunk_seq, d.chunk, '
               '(d.embedding %2$s $1::%3$s)::float8 AS distance '
               'FROM pgembed.%4$I d%5$s ORDER BY d.embedding %2$s $1::%3$s LIMIT $2',
               pgembed.sql_list('%1$L, d.%1$I', p.key_columns), o.op, pgembed.embedding_type(p), p.destination,
               j.cond)
           END
      FROM (SELECT format('OPERATOR(%s.%s)', pgembed.vector_schema(),
                          CASE p.distance WHEN 'cosine' THEN '<=>' WHEN 'l2' THEN '<->' ELSE '<#>' END) AS op) AS o,
           (SELECT CASE WHEN source_filter IS NOT NULL
                             OR (SELECT c.relrowsecurity FROM pg_catalog.pg_class c WHERE c.oid = p.source)
                        THEN format(' WHERE EXISTS (SELECT 1 FROM %s s WHERE %s%s)', p.source,
                                    pgembed.sql_list('s.%1$I = d.%1$I', p.key_columns, ' AND '),
                                    ' AND ' || source_filter)
                        ELSE '' END AS cond) AS j
$$;
