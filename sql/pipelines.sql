-- pgembed pipelines: models, creating and dropping a pipeline and its destination table.

-- The model row for a model name; hash:N models are made up on the spot.
CREATE OR REPLACE FUNCTION pgembed.model_info(p_model text)
RETURNS pgembed.models
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.models;
    n int;
BEGIN
    SELECT * INTO m FROM pgembed.models WHERE model = p_model;
    IF FOUND THEN
        RETURN m;
    END IF;
    IF p_model ~ '^hash:[0-9]{1,5}$' THEN
        n := substr(p_model, 6)::int;
        IF n NOT BETWEEN 1 AND 16000 THEN
            RAISE EXCEPTION 'pgembed: hash models take 1 to 16000 dimensions, not %', n;
        END IF;
        RETURN ROW(p_model, n, true, 1000000, 100000, 100000000, 0, 'h' || n, 'cl100k')::pgembed.models;
    END IF;
    RAISE EXCEPTION 'pgembed: unknown model "%"', p_model
        USING HINT = 'Use one of pgembed.models (e.g. openai:text-embedding-3-small), hash:N, '
                     'or register an OpenAI-compatible model: INSERT INTO pgembed.models '
                     '(model, dimensions, short_name) VALUES (''openai:NAME'', DIMS, ''short'').';
END
$$;

-- The schema pgvector was installed in, quoted: generated DDL names vector types and
-- operator classes through it, since our pinned search_path does not include it.
CREATE OR REPLACE FUNCTION pgembed.vector_schema()
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT quote_ident(n.nspname)
      FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'vector'
$$;

-- The SQL type of a pipeline's stored vectors, vector(n) or halfvec(n), named through
-- pgvector's schema: the destination's column, the store's cast and the search's query
-- vector all say it the same way.
CREATE OR REPLACE FUNCTION pgembed.embedding_type(p pgembed.pipelines)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%s.%s(%s)', pgembed.vector_schema(),
                  CASE p.storage WHEN 'halfvec' THEN 'halfvec' ELSE 'vector' END, p.dimensions)
$$;

-- What a pipeline's vector index holds, as CREATE INDEX and ORDER BY write it over `col`
-- (the column, qualified or not): the stored vectors themselves, or for binary quantization
-- one bit a dimension, binary_quantize(col)::bit(n). A search reaches the index only if its
-- ORDER BY says exactly this.
CREATE OR REPLACE FUNCTION pgembed.index_expression(p pgembed.pipelines, col text)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p.quantization = 'binary'
                THEN format('(%s.binary_quantize(%s)::bit(%s))', pgembed.vector_schema(), col, p.dimensions)
                ELSE col END
$$;

-- The operator class of a pipeline's vector index: the storage's, for the distance
-- (halfvec_cosine_ops...), or bit_hamming_ops over binary-quantized vectors.
CREATE OR REPLACE FUNCTION pgembed.index_opclass(p pgembed.pipelines)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgembed.vector_schema() || '.'
           || CASE WHEN p.quantization = 'binary' THEN 'bit_hamming'
                   ELSE CASE p.storage WHEN 'halfvec' THEN 'halfvec' ELSE 'vector' END
                        || CASE p.distance WHEN 'cosine' THEN '_cosine' WHEN 'l2' THEN '_l2' ELSE '_ip' END
              END || '_ops'
$$;

-- pgvector's limits on what an index holds: vector 2,000 dimensions, halfvec 4,000, bit
-- (binary quantization) 64,000.
CREATE OR REPLACE FUNCTION pgembed.index_max_dimensions(p_storage text, p_quantization text)
RETURNS int
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p_quantization = 'binary' THEN 64000 WHEN p_storage = 'halfvec' THEN 4000 ELSE 2000 END
$$;

-- Primary key columns of a table, in key order, with their SQL types.
CREATE OR REPLACE FUNCTION pgembed.primary_key(p_source regclass,
                                               OUT columns name[], OUT types text[])
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT array_agg(a.attname ORDER BY k.ord),
           array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord)
    FROM pg_catalog.pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = p_source AND i.indisprimary
$$;

-- The destination table's name: {table}_{model short name}[_{dimensions}], at most 63
-- bytes, with a short hash of the full name when the table name had to be cut.
CREATE OR REPLACE FUNCTION pgembed.destination_name(p_source regclass, p_model pgembed.models,
                                                    p_dimensions int)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl text := (SELECT relname FROM pg_catalog.pg_class WHERE oid = p_source);
    suffix text := '_' || p_model.short_name
                   || CASE WHEN p_dimensions <> p_model.dimensions THEN '_' || p_dimensions ELSE '' END;
    full_name text := tbl || suffix;
    candidate text := full_name;
    n int := 1;
BEGIN
    IF octet_length(full_name) > 63 THEN
        suffix := '_' || left(md5(p_source::oid::text || full_name), 6) || suffix;
        WHILE octet_length(tbl || suffix) > 63 LOOP
            tbl := left(tbl, length(tbl) - 1);
        END LOOP;
        full_name := tbl || suffix;
        candidate := full_name;
    END IF;
    -- a second pipeline of the same table and model (another content) gets _2, _3...
    WHILE EXISTS (SELECT 1 FROM pgembed.pipelines WHERE name = candidate)
          OR to_regclass(format('pgembed.%I', candidate)) IS NOT NULL LOOP
        n := n + 1;
        candidate := left(full_name, 63 - length('_' || n)) || '_' || n;
    END LOOP;
    RETURN candidate;
END
$$;

-- A pipeline's name is its destination table's name in schema pgembed, and shows in logs,
-- the command line's output and NOTIFY payloads. Allowed: 1 to 63 bytes (PostgreSQL cuts
-- identifiers at 63, so two longer names could become one table), no control character
-- (newline, tab, U+0001-U+001F, U+007F-U+009F; text cannot hold U+0000), no space at
-- either end, and not the name of a pipeline or of any relation or type already in schema
-- pgembed. Anything else (quotes, spaces inside, punctuation, any other Unicode) is fine:
-- it is always quoted.
-- p_derived: the name was made from the table's name, not given.
CREATE OR REPLACE FUNCTION pgembed.check_pipeline_name(p_name text, p_derived boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shown text := to_json(p_name)::text;  -- double-quoted, control characters escaped
    rule text := 'A pipeline name (the name of its table in schema pgembed) has 1 to 63 bytes, '
                 'no control characters and no space at either end; leave name out for '
                 'the default {table}_{model}.';
    kind text;
BEGIN
    IF p_name !~ '[^[:space:]]' THEN
        RAISE EXCEPTION 'pgembed: a pipeline name cannot be empty or blank'
            USING HINT = rule;
    END IF;
    IF octet_length(p_name) > 63 THEN
        RAISE EXCEPTION 'pgembed: pipeline name % is % bytes long; pipeline names are at most 63 bytes',
            shown, octet_length(p_name)
            USING HINT = 'PostgreSQL cuts identifiers at 63 bytes, so two longer names sharing '
                         'their first 63 bytes would name one table. Pass a shorter name.';
    END IF;
    IF p_name ~ '[\u0001-\u001f\u007f-\u009f]' THEN
        RAISE EXCEPTION 'pgembed: pipeline name % contains a control character', shown
            USING HINT = CASE WHEN p_derived
                THEN 'The name was made from the table''s name; pass name => ''...'' instead. '
                ELSE '' END || rule;
    END IF;
    IF p_name ~ '^[[:space:]]|[[:space:]]$' THEN
        RAISE EXCEPTION 'pgembed: pipeline name % begins or ends with a space', shown
            USING HINT = rule;
    END IF;
    IF EXISTS (SELECT 1 FROM pgembed.aliases a WHERE a.name = p_name) THEN
        RAISE EXCEPTION 'pgembed: "%" is the name of an alias; a pipeline needs a name of its own', p_name
            USING HINT = 'Alias and pipeline names share one namespace (pgembed alias list): pass another name => ....';
    END IF;
    IF EXISTS (SELECT 1 FROM pgembed.pipelines q WHERE q.name = p_name) THEN
        RAISE EXCEPTION 'pgembed: a pipeline named "%" exists already', p_name
            USING HINT = 'Pass another name => ..., or drop it first: SELECT pgembed.drop_pipeline(...).';
    END IF;
    SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view'
                          WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence'
                          WHEN 'f' THEN 'foreign table' WHEN 'c' THEN 'type'
                          ELSE 'index' END
      INTO kind
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace = 'pgembed'::regnamespace AND c.relname = p_name::name;
    IF kind IS NULL AND EXISTS (SELECT 1 FROM pg_catalog.pg_type t
                                 WHERE t.typnamespace = 'pgembed'::regnamespace
                                   AND t.typname = p_name::name) THEN
        kind := 'type';
    END IF;
    IF kind IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: pipeline name % is taken by pgembed''s % pgembed.%', shown, kind,
            quote_ident(p_name)
            USING HINT = 'A pipeline''s table is created in schema pgembed under the pipeline''s '
                         'name; pass another name => ..., or leave name out for the default.';
    END IF;
END
$$;

-- What a worker needs of one pipeline's own objects, granted to the group role
-- pgembed_worker (see privileges.sql): its destination table and its generated read and
-- store functions. The source table is the DBA's to grant (GRANT SELECT ON ... TO
-- pgembed_worker): pgembed does not hand out rights on the application's tables. Skipped
-- when the role does not exist (dropped by a DBA who grants by hand).
CREATE OR REPLACE FUNCTION pgembed.grant_pipeline_to_workers(p pgembed.pipelines)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f record := pgembed.pipeline_functions(p);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgembed_worker') THEN
        RETURN;
    END IF;
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON pgembed.%I TO pgembed_worker', p.destination);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s, %s TO pgembed_worker', f.reader, f.store);
END
$$;

-- A pipeline's generated search: pgembed.search without a filter comes here (see
-- search.sql). It is the one read of the nearest chunks, best per row, as static SQL: the
-- session plans it without parsing it again, and plans it for each call's LIMIT
-- (force_custom_plan), which a generic plan would have to guess. The query comes as the
-- stored vectors' type, cast once by the caller: cast in the SQL, it would be cast again
-- for every chunk's distance. Not SECURITY DEFINER: the caller's rights on the destination
-- decide, as they do for pgembed.search.
CREATE OR REPLACE FUNCTION pgembed.search_function(p pgembed.pipelines)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('pgembed.%I(query %s, wanted bigint, k int)', 'p' || p.id || '_search', pgembed.embedding_type(p))
$$;

CREATE OR REPLACE FUNCTION pgembed.generate_search_function(p pgembed.pipelines)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fn text;
BEGIN
    -- one search per pipeline: one for another storage type goes
    FOR fn IN SELECT q.oid::regprocedure::text FROM pg_catalog.pg_proc q
               WHERE q.pronamespace = 'pgembed'::regnamespace AND q.proname = 'p' || p.id || '_search'
                 AND q.proargtypes[0] <> pgembed.embedding_type(p)::regtype LOOP
        EXECUTE 'DROP FUNCTION ' || fn;
    END LOOP;
    EXECUTE format('CREATE OR REPLACE FUNCTION %s RETURNS TABLE (key jsonb, chunk_seq int, chunk text, '
                   'distance double precision, read bigint) LANGUAGE sql STABLE '
                   'SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_custom_plan AS %L',
                   pgembed.search_function(p),
                   format(E'-- generated by pgembed for pipeline id %s (pgembed.pipelines); do not edit\n%s',
                          p.id, pgembed.best_chunk_per_row_sql(pgembed.nearest_chunks_sql(p))));
    EXECUTE format('COMMENT ON FUNCTION %s IS %L', pgembed.search_function(p),
                   format('generated by pgembed for pipeline %s; do not edit', quote_literal(p.name)));
END
$$;

-- The signatures before `chunking` was an argument: a call naming its arguments would find
-- both. (refresh.sql drops what the definitions no longer define, but not what an earlier
-- revision created in the same transaction, as a fresh init does.)
DROP FUNCTION IF EXISTS pgembed.create_pipeline(regclass, text, text, int, text, jsonb, text, int, int, boolean,
                                                text, text);
DROP FUNCTION IF EXISTS pgembed.create_pipeline_on_path(text, regclass, text, text, int, text, jsonb, text, int,
                                                        int, boolean, text, text);
-- and before storage, quantization and rerank were
DROP FUNCTION IF EXISTS pgembed.create_pipeline(regclass, text, text, int, text, jsonb, text, int, int, boolean,
                                                text, text, text, text);
DROP FUNCTION IF EXISTS pgembed.create_pipeline_on_path(text, regclass, text, text, int, text, jsonb, text, int,
                                                        int, boolean, text, text, text, text);
-- and before late_chunking was
DROP FUNCTION IF EXISTS pgembed.create_pipeline(regclass, text, text, int, text, jsonb, text, int, int, boolean,
                                                text, text, text, text, text, text, int);
DROP FUNCTION IF EXISTS pgembed.create_pipeline_on_path(text, regclass, text, text, int, text, jsonb, text, int,
                                                        int, boolean, text, text, text, text, text, text, int);

-- A pipeline's chunking, from create_pipeline's arguments: (strategy, tokens, overlap).
-- Left out, they fit the model: recursive chunks of min(256, 3/4 of the model's window)
-- tokens overlapping by 15%, counted with the model's tokenizer (the worker also keeps every
-- chunk within the window less the special tokens). chunk_tokens alone keeps its old
-- meaning: 0 is no chunking (chunking 'none', a row too long for the model fails), N > 0
-- cl100k windows of N tokens (chunking 'tokens').
CREATE OR REPLACE FUNCTION pgembed.chunking_settings(m pgembed.models, p_chunking text, p_tokens int,
                                                     p_overlap int,
                                                     OUT chunking text, OUT chunk_tokens int, OUT chunk_overlap int)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    strategies text[] := '{recursive,markdown,tokens,truncate,none}';
    rule text := 'chunking => ''recursive'' (the default), ''markdown'', ''tokens'', ''truncate'' or '
                 '''none''; chunk_tokens 1 to the model''s window, chunk_overlap 0 to chunk_tokens - 1.';
BEGIN
    chunking := coalesce(p_chunking, CASE WHEN p_tokens = 0 THEN 'none'
                                          WHEN p_tokens > 0 THEN 'tokens' ELSE 'recursive' END);
    IF NOT chunking = ANY (strategies) THEN
        RAISE EXCEPTION 'pgembed: unknown chunking strategy %', quote_literal(chunking) USING HINT = rule;
    END IF;
    IF chunking = 'none' THEN
        IF coalesce(p_tokens, 0) <> 0 OR coalesce(p_overlap, 0) <> 0 THEN
            RAISE EXCEPTION 'pgembed: chunking ''none'' embeds the content whole: it takes no chunk_tokens or chunk_overlap (got %, %)',
                p_tokens, p_overlap USING HINT = rule;
        END IF;
        chunk_tokens := 0;
        chunk_overlap := 0;
        RETURN;
    END IF;
    chunk_tokens := coalesce(p_tokens, least(256, m.max_input_tokens * 3 / 4));
    IF chunk_tokens < 1 THEN
        RAISE EXCEPTION 'pgembed: chunking % needs chunk_tokens of 1 or more, not %', quote_literal(chunking),
            chunk_tokens USING HINT = rule;
    END IF;
    IF chunk_tokens > m.max_input_tokens THEN
        RAISE EXCEPTION 'pgembed: chunk_tokens % is more than model % reads (% tokens)', chunk_tokens,
            m.model, m.max_input_tokens USING HINT = rule;
    END IF;
    chunk_overlap := coalesce(p_overlap, CASE WHEN chunking = 'truncate' THEN 0 ELSE chunk_tokens * 15 / 100 END);
    IF chunk_overlap < 0 OR chunk_overlap >= chunk_tokens THEN
        RAISE EXCEPTION 'pgembed: chunk_overlap must be 0 to chunk_tokens - 1 (%), not %', chunk_tokens - 1,
            chunk_overlap USING HINT = rule;
    END IF;
    IF chunking = 'truncate' AND chunk_overlap <> 0 THEN
        RAISE EXCEPTION 'pgembed: chunking ''truncate'' keeps one chunk: chunk_overlap must be 0, not %',
            chunk_overlap USING HINT = rule;
    END IF;
END
$$;

-- The content a pipeline with a chunk prefix evaluates: the prefix, U+001E, the content.
-- The worker embeds the prefix at the head of every chunk of the content; one expression
-- carries both, so everything that follows the content (the capture's columns, the binding
-- view, the audit's hash) follows the prefix too. A U+001E in the prefix's value becomes a
-- space (the first one is the separator); content that is NULL or blank stays NULL: the row
-- has nothing to embed, with or without its title.
CREATE OR REPLACE FUNCTION pgembed.prefixed_content(p_prefix text, p_content text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format(E'CASE WHEN pg_catalog.btrim((%2$s\n)::pg_catalog.text, E'' \\t\\n\\r\\f\\v'') = '''' THEN NULL '
                  || E'ELSE pg_catalog.replace(coalesce((%1$s\n)::pg_catalog.text, ''''), E''\\x1e'', '' '') '
                  || E'|| E''\\x1e'' || (%2$s\n)::pg_catalog.text END', p_prefix, p_content)
$$;

-- A pipeline's storage, from create_pipeline's arguments: (storage, quantization, rerank),
-- checked against the index and its dimensions before anything is created, so that a
-- pipeline pgvector cannot index is refused with what would fit instead of failing in
-- CREATE INDEX. rerank (candidates read per row returned) is 10 unless given, and only
-- for binary quantization.
CREATE OR REPLACE FUNCTION pgembed.storage_settings(p_index text, p_dimensions int, p_storage text,
                                                    p_quantization text, p_rerank int,
                                                    OUT storage text, OUT quantization text, OUT rerank int)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    limit_dims int;
BEGIN
    storage := coalesce(p_storage, 'vector');
    quantization := coalesce(p_quantization, 'none');
    IF storage NOT IN ('vector', 'halfvec') THEN
        RAISE EXCEPTION 'pgembed: storage must be vector or halfvec, not %', quote_literal(storage)
            USING HINT = 'storage => ''vector'' (the default: 4-byte floats) or ''halfvec'' (2-byte floats, '
                         'half the size, indexed up to 4000 dimensions).';
    END IF;
    IF quantization NOT IN ('none', 'binary') THEN
        RAISE EXCEPTION 'pgembed: quantization must be none or binary, not %', quote_literal(quantization)
            USING HINT = 'quantization => ''none'' (the default) or ''binary'' (an HNSW index of one bit a '
                         'dimension, searches re-ranked by the stored vectors).';
    END IF;
    IF quantization = 'binary' AND p_index <> 'hnsw' THEN
        RAISE EXCEPTION 'pgembed: binary quantization needs index => ''hnsw'', not %', quote_literal(p_index)
            USING HINT = 'A binary-quantized index is an HNSW index of bits; leave quantization out for '
                         'an ivfflat index or none.';
    END IF;
    IF p_rerank IS NOT NULL AND quantization = 'none' THEN
        RAISE EXCEPTION 'pgembed: rerank is for quantization => ''binary'' only'
            USING HINT = 'Leave rerank out, or pass quantization => ''binary''.';
    END IF;
    IF quantization = 'binary' THEN
        rerank := coalesce(p_rerank, 10);
        IF rerank NOT BETWEEN 1 AND 100 THEN
            RAISE EXCEPTION 'pgembed: rerank must be from 1 to 100, not %', rerank
                USING HINT = 'A search reads rerank times as many candidates as it returns (10 when left out).';
        END IF;
    END IF;
    limit_dims := pgembed.index_max_dimensions(storage, quantization);
    IF p_index <> 'none' AND p_dimensions > limit_dims THEN
        RAISE EXCEPTION 'pgembed: % indexes of % hold at most % dimensions, not %', p_index,
            CASE WHEN quantization = 'binary' THEN 'binary-quantized vectors' ELSE storage END, limit_dims,
            p_dimensions
            USING HINT = CASE WHEN storage = 'vector' AND p_dimensions <= 4000
                              THEN 'Pass storage => ''halfvec'' (indexed up to 4000 dimensions), '
                              ELSE 'Pass ' END
                         || format('dimensions => %s or fewer, or index => ''none''.', limit_dims);
    END IF;
END
$$;

-- Late chunking runs the model once over the whole document and pools each chunk's own
-- tokens: only a local model gives pgembed its token states, and a strategy that keeps one
-- chunk of a document (none, truncate) has nothing to pool apart.
CREATE OR REPLACE FUNCTION pgembed.check_late_chunking(m pgembed.models, p_chunking text, p_late boolean)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_late IS NULL THEN
        RAISE EXCEPTION 'pgembed: late_chunking must be true or false, not NULL'
            USING HINT = 'late_chunking => true pools each chunk from one run of the model over its document.';
    END IF;
    IF NOT p_late THEN
        RETURN;
    END IF;
    IF NOT starts_with(m.model, 'local:') THEN
        RAISE EXCEPTION 'pgembed: late chunking needs a local: model, not %: it reads the model''s token states, '
                        'which an embedding API does not return', quote_literal(m.model)
            USING HINT = 'Use a local model (e.g. local:all-MiniLM-L6-v2), or leave late_chunking out.';
    END IF;
    IF p_chunking IN ('none', 'truncate') THEN
        RAISE EXCEPTION 'pgembed: late chunking needs chunks of the whole document, and chunking % keeps one',
            quote_literal(p_chunking)
            USING HINT = 'Use chunking => ''recursive'' (the default), ''markdown'' or ''tokens'', '
                         'or leave late_chunking out.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pgembed.create_pipeline_on_path(
    search_path     text,
    source          regclass,
    content         text,
    model           text,
    dimensions      int DEFAULT NULL,
    index           text DEFAULT 'hnsw',
    index_options   jsonb DEFAULT '{}',
    distance        text DEFAULT 'cosine',
    chunk_tokens    int DEFAULT NULL,
    chunk_overlap   int DEFAULT NULL,
    backfill        boolean DEFAULT true,
    cost_center     text DEFAULT NULL,
    name            text DEFAULT NULL,
    chunking        text DEFAULT NULL,
    chunk_prefix    text DEFAULT NULL,
    storage         text DEFAULT 'vector',
    quantization    text DEFAULT 'none',
    rerank          int DEFAULT NULL,
    late_chunking   boolean DEFAULT false
)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    refusal text;
    m pgembed.models;
    dims int;
    pk record;
    p pgembed.pipelines;
    reserved name[] := '{chunk_seq,chunk,content_hash,chunk_hash,embedding,embedded_at,truncated}';
    chunks record;
    clash name;
    queued bigint := 0;
    options jsonb;
    stored record;
BEGIN
    -- Every argument is checked before anything is locked or created, each refusal with
    -- pgembed's own message and a hint saying what is allowed.
    IF source IS NULL THEN
        RAISE EXCEPTION 'pgembed: source must name a table, not NULL'
            USING HINT = 'Pass the table whose rows are embedded, e.g. source => ''public.articles''.';
    END IF;
    refusal := pgembed.source_refusal(source);
    IF refusal IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: %', refusal
            USING HINT = 'pgembed embeds the rows of a lasting table of yours (partitioned tables too): not a view, '
                         'a temporary table, one of pgembed''s, nor a table with inheritance children.';
    END IF;
    IF content IS NULL THEN
        RAISE EXCEPTION 'pgembed: content must be a SQL expression over the columns of %, not NULL', source
            USING HINT = 'For example content => ''title || '' '' || body''.';
    END IF;
    IF model IS NULL THEN
        RAISE EXCEPTION 'pgembed: model must name a model, not NULL'
            USING HINT = 'Use one of pgembed.models (e.g. openai:text-embedding-3-small) or hash:N.';
    END IF;
    m := pgembed.model_info(model);
    IF dimensions < 1 THEN
        RAISE EXCEPTION 'pgembed: dimensions must be 1 or more, not %', dimensions
            USING HINT = format('Leave dimensions out for the model''s own %s%s.', m.dimensions,
                                CASE WHEN m.shortenable THEN format(', or pass 1 to %s', m.dimensions) ELSE '' END);
    END IF;
    dims := coalesce(dimensions, m.dimensions);
    IF dims > m.dimensions OR (dims <> m.dimensions AND NOT m.shortenable) THEN
        RAISE EXCEPTION 'pgembed: model % gives % dimensions%; % is not possible', m.model,
            m.dimensions, CASE WHEN m.shortenable THEN ' or fewer' ELSE ' exactly' END, dims
            USING HINT = 'Leave dimensions out for the model''s own.';
    END IF;
    IF index IS NULL OR index NOT IN ('hnsw', 'ivfflat', 'none') THEN
        RAISE EXCEPTION 'pgembed: index must be hnsw, ivfflat or none, not %', coalesce(index, 'NULL')
            USING HINT = 'index => ''hnsw'' (the default), ''ivfflat'' or ''none'' (no vector index).';
    END IF;
    IF distance IS NULL OR distance NOT IN ('cosine', 'l2', 'ip') THEN
        RAISE EXCEPTION 'pgembed: distance must be cosine, l2 or ip, not %', coalesce(distance, 'NULL')
            USING HINT = 'distance => ''cosine'' (the default), ''l2'' (Euclidean) or ''ip'' (inner product).';
    END IF;
    stored := pgembed.storage_settings(index, dims, storage, quantization, rerank);
    options := pgembed.check_index_options(index, index_options);
    chunks := pgembed.chunking_settings(m, chunking, chunk_tokens, chunk_overlap);
    PERFORM pgembed.check_late_chunking(m, chunks.chunking, late_chunking);
    IF backfill IS NULL THEN
        RAISE EXCEPTION 'pgembed: backfill must be true or false, not NULL'
            USING HINT = 'backfill => true (the default) queues the rows already in the table; false does not.';
    END IF;
    IF name IS NOT NULL THEN
        PERFORM pgembed.check_pipeline_name(name);
    END IF;

    -- no write may slip between the triggers' creation and the backfill
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', source);
    pk := pgembed.primary_key(source);
    IF pk.columns IS NULL THEN
        RAISE EXCEPTION 'pgembed: table % has no primary key', source
            USING HINT = 'pgembed follows rows by their primary key; add one (ALTER TABLE ... ADD PRIMARY KEY).';
    END IF;
    SELECT c INTO clash FROM unnest(pk.columns) AS c WHERE c = ANY (reserved) LIMIT 1;
    IF clash IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: primary key column "%" of % clashes with a column of the destination table (%)',
            clash, source, array_to_string(reserved, ', ');
    END IF;

    p.name := coalesce(name, pgembed.destination_name(source, m, dims));
    -- again under the lock, a derived name too (from a table name with a newline, say)
    PERFORM pgembed.check_pipeline_name(p.name, p_derived => name IS NULL);
    p.source := source;
    p.content := content;
    p.search_path := search_path;
    p.chunk_prefix := chunk_prefix;
    IF chunk_prefix IS NOT NULL THEN  -- alone first, for a message that names it
        PERFORM pgembed.probe_expression(source, chunk_prefix, search_path, 'chunk_prefix');
        PERFORM pgembed.probe_expression(source, content, search_path);
    END IF;
    SELECT e.columns, e.bound, e.functions
      INTO p.content_columns, p.content_bound, p.content_functions
      FROM pgembed.probe_expression(source, CASE WHEN chunk_prefix IS NULL THEN content
                                                 ELSE pgembed.prefixed_content(chunk_prefix, content) END,
                                    search_path, p_bind => true) AS e;
    p.cost_center := cost_center;
    IF cost_center IS NOT NULL THEN
        SELECT e.bound INTO p.cost_center_bound
          FROM pgembed.probe_expression(source, cost_center, search_path, 'cost_center', p_bind => true) AS e;
    END IF;
    p.model := m.model;
    p.dimensions := dims;
    p.destination := p.name;
    p.key_columns := pk.columns;
    p.key_types := pk.types;
    p.chunking := chunks.chunking;
    p.chunk_tokens := chunks.chunk_tokens;
    p.chunk_overlap := chunks.chunk_overlap;
    p.index_type := index;
    p.index_options := options;
    p.distance := distance;
    p.storage := stored.storage;
    p.quantization := stored.quantization;
    p.rerank := stored.rerank;
    p.late_chunking := late_chunking;

    BEGIN
        INSERT INTO pgembed.pipelines (name, source, content, content_columns, content_bound,
            content_functions, cost_center, cost_center_bound, model,
            dimensions, destination, key_columns, key_types, chunk_tokens, chunk_overlap,
            index_type, index_options, distance, search_path, chunking, chunk_prefix, storage,
            quantization, rerank, late_chunking)
        VALUES (p.name, p.source, p.content, p.content_columns, p.content_bound,
            p.content_functions, p.cost_center, p.cost_center_bound, p.model,
            p.dimensions, p.destination, p.key_columns, p.key_types, p.chunk_tokens,
            p.chunk_overlap, p.index_type, p.index_options, p.distance, p.search_path, p.chunking,
            p.chunk_prefix, p.storage, p.quantization, p.rerank, p.late_chunking)
        RETURNING * INTO p;
    EXCEPTION WHEN unique_violation THEN
        -- a concurrent create_pipeline of the same name committed after our check
        RAISE EXCEPTION 'pgembed: a pipeline named "%" exists already', p.name
            USING HINT = 'Another session created it just now; pass another name => ....';
    END;

    EXECUTE format('CREATE TABLE pgembed.%I (%s, chunk_seq int NOT NULL, chunk text NOT NULL, '
                   'content_hash bytea NOT NULL, chunk_hash bytea NOT NULL, '
                   'embedding %s NOT NULL, embedded_at timestamptz NOT NULL DEFAULT now(), '
                   'truncated boolean NOT NULL DEFAULT false, PRIMARY KEY (%s, chunk_seq))',
                   p.destination,
                   (SELECT string_agg(format('%I %s NOT NULL', c, t), ', ' ORDER BY i)
                      FROM unnest(pk.columns, pk.types) WITH ORDINALITY AS u(c, t, i)),
                   pgembed.embedding_type(p), pgembed.sql_list('%1$I', pk.columns));
    -- Past about 500 dimensions a vector is TOASTed. Float vectors do not compress, so the
    -- default EXTENDED only burns CPU trying; EXTERNAL stores them out of line as they are
    -- (half again faster inserts at 768-d).
    EXECUTE format('ALTER TABLE pgembed.%I ALTER COLUMN embedding SET STORAGE EXTERNAL', p.destination);
    PERFORM pgembed.generate_pipeline_code(p);
    IF backfill THEN
        queued := pgembed.queue_all(p.name, 'backfill');
    END IF;
    -- Inserting into an HNSW graph row by row is some 40 times slower than building it once
    -- over the loaded rows: a large backfill goes in first and a worker builds the index
    -- when it is done (pgembed.deferred_indexes). Until then searches scan, exactly.
    -- An IVFFlat index is trained on the rows there when it is built: always deferred, a
    -- worker builds it once the table holds enough (pgembed.deferred_index_plan).
    IF p.index_type = 'hnsw' AND queued >= pgembed.defer_index_rows() OR p.index_type = 'ivfflat' THEN
        PERFORM pgembed.vector_index_sql(p);  -- bad index options are refused now, not later
        INSERT INTO pgembed.deferred_indexes (pipeline, rows_queued) VALUES (p.name, queued);
        IF p.index_type = 'ivfflat' THEN
            RAISE NOTICE 'pgembed: the IVFFlat index of pgembed.% is built once it holds % rows',
                p.destination, pgembed.ivfflat_rows_per_list() * coalesce((p.index_options ->> 'lists')::int, 10);
        ELSE
            RAISE NOTICE 'pgembed: the HNSW index of pgembed.% is built once its % rows are embedded',
                p.destination, queued;
        END IF;
    ELSE
        PERFORM pgembed.create_vector_index(p);
    END IF;
    RETURN p.name;
END
$$;

-- The public entry point. It has no SET clause on purpose: it captures the caller's schemas
-- (only the caller's own, never pg_temp), against which `content` is read from then on.
-- Everything it calls is schema-qualified, so a hostile path cannot redirect it.
CREATE OR REPLACE FUNCTION pgembed.create_pipeline(
    source          regclass,
    content         text,
    model           text,
    dimensions      int DEFAULT NULL,
    index           text DEFAULT 'hnsw',
    index_options   jsonb DEFAULT '{}',
    distance        text DEFAULT 'cosine',
    chunk_tokens    int DEFAULT NULL,
    chunk_overlap   int DEFAULT NULL,
    backfill        boolean DEFAULT true,
    cost_center     text DEFAULT NULL,
    name            text DEFAULT NULL,
    chunking        text DEFAULT NULL,
    chunk_prefix    text DEFAULT NULL,
    storage         text DEFAULT 'vector',
    quantization    text DEFAULT 'none',
    rerank          int DEFAULT NULL,
    late_chunking   boolean DEFAULT false
)
RETURNS text
LANGUAGE sql
AS $$
    SELECT pgembed.create_pipeline_on_path(
        (SELECT coalesce(pg_catalog.string_agg(pg_catalog.quote_ident(s), ', ' ORDER BY i),
                         'pg_catalog')
           FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) WITH ORDINALITY AS u(s, i)
          WHERE NOT pg_catalog.starts_with(s, 'pg_temp')),
        source, content, model, dimensions, index, index_options, distance,
        chunk_tokens, chunk_overlap, backfill, cost_center, name, chunking, chunk_prefix,
        storage, quantization, rerank, late_chunking)
$$;

CREATE OR REPLACE FUNCTION pgembed.drop_pipeline(name text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    f record;
    ev text;
BEGIN
    SELECT * INTO p FROM pgembed.pipelines q WHERE q.name = drop_pipeline.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgembed: no pipeline named "%"', name
            USING HINT = 'pgembed pipeline list shows the pipelines.';
    END IF;
    IF EXISTS (SELECT 1 FROM pgembed.aliases a WHERE a.pipeline = p.name) THEN
        RAISE EXCEPTION 'pgembed: pipeline "%" is what alias % points at', p.name,
            (SELECT string_agg(format('"%s"', a.name), ', ' ORDER BY a.name) FROM pgembed.aliases a
              WHERE a.pipeline = p.name)
            USING HINT = 'Point the alias at another pipeline (pgembed alias set) or drop it (pgembed alias drop) first.';
    END IF;
    -- The queue first: this waits for a worker acknowledging rows of this pipeline (it
    -- holds their row locks and is about to write the destination) and makes any later
    -- acknowledgement skip them. Dropping the destination first would take its lock while
    -- that worker needs it: a deadlock.
    DELETE FROM pgembed.outbox q WHERE q.pipeline = p.name;
    DELETE FROM pgembed.outbox_statements q WHERE q.pipeline = p.name;
    DELETE FROM pgembed.failures q WHERE q.pipeline = p.name;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = p.source) THEN
        FOREACH ev IN ARRAY '{insert,update,delete,truncate}'::text[] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'pgembed_' || p.id || '_' || ev, p.source);
        END LOOP;
    END IF;
    f := pgembed.pipeline_functions(p);
    EXECUTE format('DROP FUNCTION IF EXISTS %s, %s, %s, %s', f.capture, f.reader, f.store,
                   pgembed.search_function(p));
    EXECUTE format('DROP VIEW IF EXISTS pgembed.%I, pgembed.%I', 'p' || p.id || '_content', 'p' || p.id || '_cost_center');
    DELETE FROM pgembed.pipelines q WHERE q.name = p.name;  -- failures cascade
    EXECUTE format('DROP TABLE IF EXISTS pgembed.%I', p.destination);
END
$$;
