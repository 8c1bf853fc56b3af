-- pgembed indexes: the vector index of a destination, deferred HNSW builds, IVFFlat upkeep.

-- The index_options of create_pipeline, checked against what pgvector accepts before anything
-- is created, and returned with whole-number values (SQL NULL is {}): a JSON object of the
-- index type's own keys, hnsw m 2..100 and ef_construction 4..1000 and at least 2 * m (with
-- pgvector's defaults 16 and 64 for the one not given), ivfflat lists 1..32768; nothing for
-- index 'none'. p_index is already one of hnsw, ivfflat, none.
CREATE OR REPLACE FUNCTION pgembed.check_index_options(p_index text, p_options jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    opts jsonb := coalesce(p_options, '{}');
    allowed text[] := CASE p_index WHEN 'hnsw' THEN '{m,ef_construction}'::text[]
                                   WHEN 'ivfflat' THEN '{lists}'::text[] ELSE '{}'::text[] END;
    what text := CASE p_index
        WHEN 'hnsw' THEN 'hnsw takes {"m": 2 to 100, "ef_construction": 4 to 1000 and at least 2 * m} '
                         '(pgvector''s defaults: 16 and 64), e.g. index_options => ''{"m": 16, "ef_construction": 64}'''
        WHEN 'ivfflat' THEN 'ivfflat takes {"lists": 1 to 32768}, e.g. index_options => ''{"lists": 100}'' '
                            '(without it a worker picks lists from the row count)'
        ELSE 'index => ''none'' takes none; hnsw takes m and ef_construction, ivfflat takes lists' END;
    bounds jsonb := '{"m": [2, 100], "ef_construction": [4, 1000], "lists": [1, 32768]}';
    bad text;
    kv record;
    v numeric;
    checked jsonb := '{}';
    m int;
    ef int;
BEGIN
    IF jsonb_typeof(opts) <> 'object' THEN
        RAISE EXCEPTION 'pgembed: index_options must be a JSON object, not %',
            CASE jsonb_typeof(opts) WHEN 'array' THEN 'an array' WHEN 'null' THEN 'null'
                 WHEN 'boolean' THEN 'a boolean' ELSE 'a ' || jsonb_typeof(opts) END
              || CASE WHEN jsonb_typeof(opts) = 'null' THEN '' ELSE ' (' || left(opts::text, 60) || ')' END
            USING HINT = 'Pass a JSON object of the index''s options, or nothing: ' || what || '.';
    END IF;
    IF p_index = 'none' AND opts <> '{}' THEN
        RAISE EXCEPTION 'pgembed: index => ''none'' takes no index_options (got %)', left(opts::text, 60)
            USING HINT = 'Leave index_options out, or choose index => ''hnsw'' (m, ef_construction) '
                         'or ''ivfflat'' (lists).';
    END IF;
    SELECT string_agg(k, ', ' ORDER BY k) INTO bad
      FROM jsonb_object_keys(opts) AS k WHERE k <> ALL (allowed);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: % index options are %, not %', p_index,
            array_to_string(allowed, ', '), bad
            USING HINT = what || '.';
    END IF;
    FOR kv IN SELECT key, value FROM jsonb_each(opts) ORDER BY key LOOP
        v := CASE WHEN jsonb_typeof(kv.value) = 'number' THEN (kv.value::text)::numeric END;
        IF v IS NULL OR v <> trunc(v) THEN
            RAISE EXCEPTION 'pgembed: % index option % must be a whole number, not %',
                p_index, kv.key, left(kv.value::text, 60)
                USING HINT = what || '.';
        END IF;
        IF v < (bounds -> kv.key ->> 0)::int OR v > (bounds -> kv.key ->> 1)::int THEN
            RAISE EXCEPTION 'pgembed: % index option % must be from % to %, not %', p_index, kv.key,
                bounds -> kv.key ->> 0, bounds -> kv.key ->> 1, left(kv.value::text, 60)
                USING HINT = what || '.';
        END IF;
        checked := checked || jsonb_build_object(kv.key, v::int);
    END LOOP;
    IF p_index = 'hnsw' THEN
        m := coalesce((checked ->> 'm')::int, 16);
        ef := coalesce((checked ->> 'ef_construction')::int, 64);
        IF ef < 2 * m THEN
            RAISE EXCEPTION 'pgembed: hnsw index option ef_construction must be at least 2 * m (%), not %',
                2 * m, ef || CASE WHEN checked ? 'ef_construction' THEN '' ELSE ' (the default)' END
                USING HINT = what || '.';
        END IF;
    END IF;
    RETURN checked;
END
$$;

-- The vector index of a destination table.
-- The CREATE INDEX statement of a pipeline's vector index (NULL for index 'none'): over the
-- stored vectors with their storage's operator class, or over their binary quantization.
-- CONCURRENTLY for a build while the application writes: its deletes remove vectors.
CREATE OR REPLACE FUNCTION pgembed.vector_index_sql(p pgembed.pipelines, p_concurrently boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    allowed text[] := CASE p.index_type WHEN 'hnsw' THEN '{m,ef_construction}'::text[]
                                        ELSE '{lists}'::text[] END;
    opts text;
    bad text;
BEGIN
    IF p.index_type = 'none' THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(k, ', ') INTO bad
      FROM jsonb_object_keys(p.index_options) AS k WHERE k <> ALL (allowed);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: % index options are %, not %', p.index_type,
            array_to_string(allowed, ', '), bad;
    END IF;
    SELECT string_agg(format('%s = %s', key, (value #>> '{}')::int), ', ')
      INTO opts FROM jsonb_each(p.index_options);
    -- unnamed: PostgreSQL picks a unique name even when long table names share a prefix
    RETURN format('CREATE INDEX %sON pgembed.%I USING %s (%s %s)%s',
                  CASE WHEN p_concurrently THEN 'CONCURRENTLY ' ELSE '' END,
                  p.destination, p.index_type, pgembed.index_expression(p, 'embedding'), pgembed.index_opclass(p),
                  CASE WHEN opts IS NULL THEN '' ELSE ' WITH (' || opts || ')' END);
END
$$;

CREATE OR REPLACE FUNCTION pgembed.create_vector_index(p pgembed.pipelines)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ddl text := pgembed.vector_index_sql(p);
BEGIN
    IF ddl IS NOT NULL THEN
        EXECUTE ddl;
    END IF;
END
$$;

-- Below this many rows a backfill goes straight into the index: building it afterwards
-- saves little, and the index is there at once.
CREATE OR REPLACE FUNCTION pgembed.defer_index_rows()
RETURNS bigint
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 10000::bigint $$;

-- An IVFFlat index is trained on the rows present when it is built (k-means over them):
-- built on an empty table its lists mean nothing. So create_pipeline defers it like a
-- large backfill's HNSW index, and a worker builds it once the destination holds
-- ivfflat_rows_per_list() rows for each of its lists (the index_options' lists, else the
-- fewest a worker picks, 10): 1,000 rows by default. 100 rows a list: pgvector's k-means
-- samples 50 a list, and fewer leaves lists empty or nearly so.
CREATE OR REPLACE FUNCTION pgembed.ivfflat_rows_per_list()
RETURNS int
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 100 $$;

-- The lists of an IVFFlat index over `row_count` vectors: the index_options' lists when
-- given, else pgvector's guidance, rows / 1000 up to a million rows and sqrt(rows) past
-- it, at least 10.
CREATE OR REPLACE FUNCTION pgembed.ivfflat_lists(p pgembed.pipelines, row_count bigint)
RETURNS int
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((p.index_options ->> 'lists')::int,
                    CASE WHEN row_count <= 1000000 THEN greatest(10, row_count / 1000)
                         ELSE ceil(sqrt(row_count)) END::int)
$$;

-- Deferred indexes that can be built now, with the statements that build them (outside a
-- transaction: CONCURRENTLY) and that first drop what an interrupted build left (an
-- INVALID index of the same kind on the destination): an HNSW index once its backfill (or
-- a migration's) is over, an IVFFlat index once that too is over and the destination holds enough rows to
-- train it (its lists are then chosen from the rows it holds).
CREATE OR REPLACE FUNCTION pgembed.deferred_index_plan()
RETURNS TABLE (pipeline text, create_sql text, drop_sql text[])
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    need bigint;
    n bigint;
BEGIN
    FOR p IN SELECT q.* FROM pgembed.deferred_indexes d
               JOIN pgembed.pipelines q ON q.name = d.pipeline
              WHERE NOT EXISTS (SELECT 1 FROM pgembed.outbox o
                                 WHERE o.pipeline = d.pipeline AND o.purpose IN ('backfill', 'migration'))
              ORDER BY q.name LOOP
        IF p.index_type = 'ivfflat' THEN
            -- counted no further than needed: workers ask often while rows come in
            need := pgembed.ivfflat_rows_per_list()::bigint * coalesce((p.index_options ->> 'lists')::int, 10);
            EXECUTE format('SELECT count(*) FROM (SELECT FROM pgembed.%I LIMIT $1) AS r', p.destination)
               INTO n USING need;
            CONTINUE WHEN n < need;
            EXECUTE format('SELECT count(*) FROM pgembed.%I', p.destination) INTO n;
            p.index_options := jsonb_build_object('lists', pgembed.ivfflat_lists(p, n));
        END IF;
        pipeline := p.name;
        create_sql := pgembed.vector_index_sql(p, true);
        drop_sql := ARRAY(SELECT format('DROP INDEX CONCURRENTLY IF EXISTS pgembed.%I', c.relname)
                            FROM pg_catalog.pg_index i
                            JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
                            JOIN pg_catalog.pg_am am ON am.oid = c.relam
                           WHERE i.indrelid = format('pgembed.%I', p.destination)::regclass
                             AND am.amname = p.index_type AND NOT i.indisvalid
                           ORDER BY c.relname);
        RETURN NEXT;
    END LOOP;
END
$$;

-- A deferred index is built: its row goes, and an IVFFlat index is recorded in
-- index_builds (its name, the lists it was built with, the rows it holds), which the
-- upkeep compares the table's growth with and search sets ivfflat.probes from.
CREATE OR REPLACE FUNCTION pgembed.deferred_index_built(p_pipeline text, p_worker text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    built record;
    n bigint;
BEGIN
    DELETE FROM pgembed.deferred_indexes WHERE pipeline = p_pipeline;
    SELECT * INTO p FROM pgembed.pipelines q WHERE q.name = p_pipeline;
    IF p.index_type <> 'ivfflat' THEN
        RETURN;
    END IF;
    SELECT c.relname, (SELECT split_part(o, '=', 2)::int FROM unnest(c.reloptions) AS o
                        WHERE o LIKE 'lists=%') AS lists
      INTO built
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
      JOIN pg_catalog.pg_am am ON am.oid = c.relam
     WHERE i.indrelid = format('pgembed.%I', p.destination)::regclass AND am.amname = 'ivfflat' AND i.indisvalid
     ORDER BY c.oid DESC LIMIT 1;
    EXECUTE format('SELECT count(*) FROM pgembed.%I', p.destination) INTO n;
    PERFORM pgembed.record_index_build(p.name, built.relname, built.lists, n, p_worker);
END
$$;

-- IVFFlat upkeep plan, one row per ivfflat pipeline, for the scheduled index job. A new
-- pipeline's first index is a deferred one, which the workers build ('deferred' here). An
-- index that went missing (dropped, or a failed build) is built again once the table holds
-- p_min_rows vectors, with pgembed.ivfflat_lists. Later, when the table has grown
-- p_rebuild_factor times, the plan says so ('rebuild_advised').
--   action: 'deferred', 'wait' (too few rows), 'build', 'rebuild_advised', 'ok'
--   create_sql / drop_sql: the statements to run (CONCURRENTLY, so outside a transaction)
CREATE OR REPLACE FUNCTION pgembed.ivfflat_plan(p_min_rows bigint, p_rebuild_factor double precision)
RETURNS TABLE (pipeline text, destination name, row_count bigint, built_rows bigint,
               built_lists int, lists int, action text, index_name text, create_sql text,
               drop_sql text[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    b pgembed.index_builds;
    current_ok boolean;
BEGIN
    FOR p IN SELECT * FROM pgembed.pipelines q WHERE q.index_type = 'ivfflat' ORDER BY q.name LOOP
        pipeline := p.name;
        destination := p.destination;
        EXECUTE format('SELECT count(*) FROM pgembed.%I', p.destination) INTO row_count;
        SELECT * INTO b FROM pgembed.index_builds ib WHERE ib.pipeline = p.name;
        built_rows := b.rows_at_build;
        built_lists := b.lists;
        lists := pgembed.ivfflat_lists(p, row_count);
        -- the recorded index must still exist and be valid (a failed CONCURRENTLY build is not)
        SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
                        WHERE c.relname = b.index_name AND c.relnamespace = 'pgembed'::regnamespace
                          AND i.indisvalid)
          INTO current_ok;
        action := CASE
            WHEN EXISTS (SELECT 1 FROM pgembed.deferred_indexes d WHERE d.pipeline = p.name) THEN 'deferred'
            WHEN row_count < greatest(p_min_rows, 1) THEN 'wait'
            WHEN b.pipeline IS NULL OR NOT current_ok THEN 'build'
            WHEN row_count >= b.rows_at_build * p_rebuild_factor THEN 'rebuild_advised'
            ELSE 'ok' END;
        index_name := left(p.destination, 40) || '_ivfflat_'
                      || to_char(clock_timestamp(), 'YYYYMMDDHH24MISS');
        create_sql := format('CREATE INDEX CONCURRENTLY %I ON pgembed.%I USING ivfflat (embedding %s) '
                             'WITH (lists = %s)', index_name, p.destination, pgembed.index_opclass(p), lists);
        -- every other ivfflat index on the destination goes once the new one is valid
        SELECT coalesce(array_agg(format('DROP INDEX CONCURRENTLY IF EXISTS pgembed.%I', c.relname)
                                  ORDER BY c.relname), '{}')
          INTO drop_sql
          FROM pg_catalog.pg_index i
          JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
          JOIN pg_catalog.pg_am am ON am.oid = c.relam
         WHERE i.indrelid = format('pgembed.%I', p.destination)::regclass
           AND am.amname = 'ivfflat' AND c.relname <> index_name;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgembed.record_index_build(p_pipeline text, p_index_name name, p_lists int,
                                                      p_rows bigint, p_worker text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgembed.index_builds AS b (pipeline, index_name, lists, rows_at_build, built_by)
    VALUES (p_pipeline, p_index_name, p_lists, p_rows, p_worker)
    ON CONFLICT (pipeline) DO UPDATE
       SET index_name = excluded.index_name, lists = excluded.lists,
           rows_at_build = excluded.rows_at_build, built_at = now(), built_by = excluded.built_by;
$$;
