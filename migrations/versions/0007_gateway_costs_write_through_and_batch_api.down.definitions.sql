-- pgembed expressions: what a content (or cost_center) expression may be, and its bound form.
--
-- Every function pins search_path to pg_catalog, pg_temp and qualifies what it calls, so a
-- lookalike schema or function earlier on a caller's path changes nothing. Identifiers from
-- users go through format('%I'); values are bound or quoted with %L.

-- The columns of p_source that a view over it reads, in table order. A view's rewrite rule
-- records in pg_depend each column it reads; refobjsubid 0 is a whole-row reference, and
-- then every column counts. (The probe view of probe_expression, and each pipeline's binding
-- view, see capture.sql.)
CREATE OR REPLACE FUNCTION pgembed.view_columns(p_view regclass, p_source regclass)
RETURNS name[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(a.attname ORDER BY a.attnum), '{}')
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = p_source AND a.attnum > 0 AND NOT a.attisdropped
       AND EXISTS (
           SELECT 1 FROM pg_catalog.pg_depend d
             JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
            WHERE r.ev_class = p_view
              AND d.refobjid = p_source
              AND d.refobjsubid IN (0, a.attnum))
$$;

-- The expression of a view "SELECT (<expression>)::text AS pgembed_content FROM <source>
-- WHERE false", deparsed on our pinned search_path: every name bound to the object it
-- means now, every function, operator and type outside pg_catalog schema-qualified (as
-- pg_dump prints a view). NULL when the deparsed view does not have that shape. A view of
-- NULL::text over the same table shows what comes before and after the expression.
CREATE OR REPLACE FUNCTION pgembed.view_expression(p_view regclass, p_source regclass)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shape_view text := 'pgembed_shape_' || pg_backend_pid();
    shape text;
    whole text := pg_catalog.pg_get_viewdef(p_view, false);
    head text;
    tail text;
BEGIN
    EXECUTE format('CREATE TEMP VIEW %I AS SELECT NULL::text AS pgembed_content FROM %s WHERE false',
                   shape_view, p_source);
    shape := pg_catalog.pg_get_viewdef(format('pg_temp.%I', shape_view)::regclass, false);
    EXECUTE format('DROP VIEW pg_temp.%I', shape_view);
    -- (head without its trailing blank: a multi-line expression starts on a new line)
    head := rtrim(left(shape, strpos(shape, 'NULL::text') - 1));
    tail := substr(shape, strpos(shape, 'NULL::text') + length('NULL::text'));
    IF strpos(shape, 'NULL::text') = 0 OR left(whole, length(head)) <> head
       OR right(whole, length(tail)) <> tail OR length(whole) <= length(head) + length(tail) THEN
        RETURN NULL;
    END IF;
    RETURN btrim(substr(whole, length(head) + 1, length(whole) - length(head) - length(tail)), E' \n');
END
$$;

-- Checks that `p_content` is one SQL expression over the columns of `p_source`, read on
-- search_path `p_path`, and returns the columns it reads and the functions it calls. A
-- cursor can only be opened on a single query, which is how stacked statements
-- ("x); DROP TABLE ...; --") are refused before anything runs; the probe view then tells,
-- from pg_depend and its stored query tree, which columns, relations and functions the
-- expression touches.
--
-- With p_bind it also returns `bound`: the same expression with every name bound to the
-- object it means now. The probe view's query tree is deparsed on search_path pg_catalog,
-- so every function, operator and type outside pg_catalog comes out schema-qualified (as
-- pg_dump prints a view). That text is checked again on its own, and must read the same
-- columns and call the same functions; from then on nobody can change what it calls by
-- creating a lookalike in a schema of the creator's path.
CREATE OR REPLACE FUNCTION pgembed.probe_expression(p_source regclass, p_content text, p_path text,
                                                    p_what text DEFAULT 'content',
                                                    p_bind boolean DEFAULT false,
                                                    OUT columns name[], OUT functions text[],
                                                    OUT bound text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    probe_view text := 'pgembed_probe_' || pg_backend_pid();
    probe refcursor;
    probe_oid oid;
    fns oid[];
    others text;
    again record;
BEGIN
    IF p_content IS NULL OR btrim(p_content) = '' THEN
        RAISE EXCEPTION 'pgembed: % must be a SQL expression over the columns of %',
            p_what, p_source;
    END IF;
    -- the expression is read with the creator's path; the SET clause restores ours on exit
    PERFORM pg_catalog.set_config('search_path', p_path, true);
    BEGIN
        OPEN probe FOR EXECUTE format(E'SELECT (%s\n)::text FROM %s WHERE false', p_content, p_source);
        CLOSE probe;
        EXECUTE format(E'CREATE TEMP VIEW %I AS SELECT (%s\n)::text AS pgembed_content FROM %s WHERE false',
                       probe_view, p_content, p_source);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'pgembed: invalid % expression for %: %', p_what, p_source, SQLERRM
            USING HINT = 'Give one SQL expression over the table''s columns, e.g. '
                         'title || '' '' || body.';
    END;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    probe_oid := format('pg_temp.%I', probe_view)::regclass;
    SELECT string_agg(DISTINCT d.refobjid::regclass::text, ', ')
      INTO others
      FROM pg_catalog.pg_depend d
      JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
     WHERE r.ev_class = probe_oid
       AND d.classid = 'pg_catalog.pg_rewrite'::regclass
       AND d.refclassid = 'pg_catalog.pg_class'::regclass
       AND d.refobjid NOT IN (p_source, r.ev_class);
    -- system catalogs leave no trace in pg_depend, so subqueries are refused outright
    IF others IS NULL AND EXISTS (
        SELECT 1 FROM pg_catalog.pg_rewrite r
         WHERE r.ev_class = probe_oid AND r.ev_action::text LIKE '%{SUBLINK%') THEN
        others := 'a subquery';
    END IF;
    -- nor is an aggregate or a window function a function of the one row being read
    IF others IS NULL AND EXISTS (
        SELECT 1 FROM pg_catalog.pg_rewrite r
         WHERE r.ev_class = probe_oid
           AND (r.ev_action::text LIKE '%:hasAggs true%' OR r.ev_action::text LIKE '%:hasWindowFuncs true%')) THEN
        others := 'an aggregate or window function';
    END IF;
    IF others IS NOT NULL THEN
        EXECUTE format('DROP VIEW pg_temp.%I', probe_view);
        RAISE EXCEPTION 'pgembed: the % expression may read only columns of %, not %',
            p_what, p_source, others;
    END IF;
    -- Workers evaluate the expression with their own rights, on every row, for as long as the
    -- pipeline lives (and the audit with the owner's, see pgembed.gaps). So it may call only
    -- functions that cannot write, owned by the creator or a superuser: a function another
    -- role owns could be replaced later by one that runs statements as the worker. And the
    -- same row must give the same text in every session, or every vector would be stale to
    -- the next audit and re-embedded forever: so no session-dependent value (now(),
    -- current_user, current_setting(), a catalog look-up...) and, of functions not built in,
    -- only IMMUTABLE ones (a STABLE function of yours may read a table or a setting). Built-in
    -- STABLE functions that only format values (concat_ws, to_char, format, casts to text)
    -- are fine: every evaluation pins the settings they read (pgembed.pinned_settings). Every
    -- function, operator, aggregate and window function the expression calls, built-in or
    -- not, is a funcid/opfuncid/aggfnoid/winfnoid in the probe view's stored query tree.
    SELECT coalesce(array_agg(DISTINCT m.id[1]::oid), '{}')
      INTO fns
      FROM pg_catalog.pg_rewrite r
     CROSS JOIN LATERAL pg_catalog.regexp_matches(r.ev_action::text,
                ':(?:funcid|opfuncid|aggfnoid|winfnoid) ([0-9]+)', 'g') AS m(id)
     WHERE r.ev_class = probe_oid;
    SELECT string_agg(DISTINCT format('%s (%s)', f.oid::regprocedure,
                      CASE WHEN f.provolatile = 'v' THEN 'VOLATILE'
                           ELSE 'owned by ' || f.proowner::regrole::text END), ', ')
      INTO others
      FROM pg_catalog.pg_proc f
     WHERE f.oid = ANY (fns)
       AND (f.provolatile = 'v'
            OR NOT (f.proowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)
                    OR (SELECT rolsuper FROM pg_catalog.pg_roles WHERE oid = f.proowner)));
    IF others IS NOT NULL THEN
        EXECUTE format('DROP VIEW pg_temp.%I', probe_view);
        RAISE EXCEPTION 'pgembed: the % expression may call only IMMUTABLE functions owned by you or a superuser, not %',
            p_what, others
            USING HINT = 'Declare your function IMMUTABLE and own it (ALTER FUNCTION ... OWNER TO ...).';
    END IF;
    SELECT string_agg(DISTINCT f.oid::regprocedure::text, ', ')
      INTO others
      FROM pg_catalog.pg_proc f
     WHERE f.oid = ANY (fns) AND f.provolatile = 's'
       AND (f.pronamespace <> 'pg_catalog'::regnamespace
            OR f.proname ~ ('^(now|statement_timestamp|transaction_timestamp|age|current_.*|session_user'
                            '|pg_backend_pid|inet_.*|pg_my_temp_schema|pg_conf_load_time|pg_postmaster_start_time'
                            '|to_reg.*|has_.*_privilege|pg_has_role|row_security_active|pg_current_.*'
                            '|pg_get_.*|.*_description|pg_.*_is_visible|pg_relation_.*|pg_.*_size|txid_.*)$'));
    IF others IS NULL AND EXISTS (
        SELECT 1 FROM pg_catalog.pg_rewrite r
         WHERE r.ev_class = probe_oid AND r.ev_action::text LIKE '%{SQLVALUEFUNCTION%') THEN
        others := 'current_user, current_timestamp or a value like them';
    END IF;
    IF others IS NOT NULL THEN
        EXECUTE format('DROP VIEW pg_temp.%I', probe_view);
        RAISE EXCEPTION 'pgembed: the % expression must give the same text for a row in every session; it uses %',
            p_what, others
            USING HINT = 'Use only the row''s columns and IMMUTABLE functions (a STABLE function of yours may '
                         'depend on the session, the clock or other tables).';
    END IF;
    -- (on our pinned path, regprocedure prints every function outside pg_catalog qualified)
    SELECT coalesce(array_agg(f::regprocedure::text ORDER BY f::regprocedure::text), '{}')
      INTO functions FROM unnest(fns) AS f;
    columns := pgembed.view_columns(probe_oid, p_source);
    IF p_bind THEN
        bound := pgembed.view_expression(probe_oid, p_source);
        IF bound IS NULL THEN
            RAISE EXCEPTION 'pgembed: cannot bind the names of the % expression for % (deparsed as %)',
                p_what, p_source, pg_catalog.pg_get_viewdef(probe_oid, false);
        END IF;
    END IF;
    EXECUTE format('DROP VIEW pg_temp.%I', probe_view);
    IF p_bind THEN
        SELECT * INTO again FROM pgembed.probe_expression(p_source, bound, 'pg_catalog, pg_temp', p_what);
        IF again.columns IS DISTINCT FROM columns OR again.functions IS DISTINCT FROM functions THEN
            RAISE EXCEPTION 'pgembed: the % expression for % does not mean the same once its names are bound (%)',
                p_what, p_source, bound;
        END IF;
    END IF;
END
$$;

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
    EXECUTE format('DROP FUNCTION IF EXISTS %s, %s, %s', f.capture, f.reader, f.store);
    EXECUTE format('DROP VIEW IF EXISTS pgembed.%I, pgembed.%I', 'p' || p.id || '_content', 'p' || p.id || '_cost_center');
    DELETE FROM pgembed.pipelines q WHERE q.name = p.name;  -- failures cascade
    EXECUTE format('DROP TABLE IF EXISTS pgembed.%I', p.destination);
END
$$;

-- pgembed capture: the per-pipeline code generated from a pipeline's row: the triggers that
-- queue changed keys, the reader and the store a worker calls.
--
-- Generated code is built from templates with named placeholders ({{name}}, filled by
-- pgembed.render) whose values are SQL fragments made here: identifiers through
-- format('%I'), values through quote_literal. A function body reaches CREATE FUNCTION as one
-- string literal (format('%L')), never inside dollar quotes, so no user text can end it.
-- Generation is repeatable: every upgrade regenerates the code of every pipeline (see
-- pgembed/schema.py), replacing the functions and creating only the triggers that are
-- missing, so an upgrade takes no lock on the application's tables.

-- format(p_template, name) for each name, joined: the small template engine of the generated
-- SQL. Templates use %1$I for the quoted column name; format() never re-reads what it inserts.
CREATE OR REPLACE FUNCTION pgembed.sql_list(p_template text, p_names name[], p_sep text DEFAULT ', ')
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(format(p_template, n), p_sep ORDER BY i)
    FROM unnest(p_names) WITH ORDINALITY AS u(n, i)
$$;

-- The typed key columns from a jsonb key array: ("k1")::int, ...
CREATE OR REPLACE FUNCTION pgembed.key_casts(p pgembed.pipelines, p_json text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(format('(%s->>%s)::%s', p_json, i - 1, t), ', ' ORDER BY i)
    FROM unnest(p.key_types) WITH ORDINALITY AS u(t, i)
$$;

-- Fills a template's {{name}} placeholders with p_values ->> name, in one pass: what is
-- filled in is never read again, so a value that holds "{{x}}" stays as it is. A
-- placeholder without a value is an error, not an empty string.
CREATE OR REPLACE FUNCTION pgembed.render(p_template text, p_values jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result text := '';
    rest text := p_template;
    open_at int;
    close_at int;
    name text;
BEGIN
    LOOP
        open_at := strpos(rest, '{{');
        EXIT WHEN open_at = 0;
        result := result || left(rest, open_at - 1);
        rest := substr(rest, open_at + 2);
        close_at := strpos(rest, '}}');
        name := left(rest, close_at - 1);
        IF close_at = 0 OR NOT p_values ? name THEN
            RAISE EXCEPTION 'pgembed: template placeholder {{%}} has no value', name;
        END IF;
        result := result || (p_values ->> name);
        rest := substr(rest, close_at + 2);
    END LOOP;
    RETURN result || rest;
END
$$;

-- The settings every evaluation of keys and content runs under: the worker's reader and
-- store, the audit, backfill, and the capture trigger of a table whose key renders
-- differently by session (a date, a timestamp...). Without them a key written under
-- DateStyle 'SQL, DMY' reaches the worker as 13/02/2024, and a timestamptz content is
-- embedded as 21:00:00+09 by a worker with PGTZ=Asia/Tokyo and called stale by the audit.
-- The static functions that render keys or content (queue_all, gaps, explain_gaps,
-- delete_orphans) carry the same SET clauses; tests/test_determinism.py checks them all.
CREATE OR REPLACE FUNCTION pgembed.pinned_setting_values(OUT name text, OUT setting text)
RETURNS SETOF record
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT v.name, v.setting
      FROM (VALUES (1, 'TimeZone', 'UTC'), (2, 'DateStyle', 'ISO, YMD'), (3, 'IntervalStyle', 'postgres'),
                   (4, 'extra_float_digits', '1'), (5, 'bytea_output', 'hex'), (6, 'lc_monetary', 'C'),
                   (7, 'lc_numeric', 'C'), (8, 'lc_time', 'C')) AS v(n, name, setting)
     ORDER BY v.n
$$;

-- The same settings as the SET clauses of a generated function.
CREATE OR REPLACE FUNCTION pgembed.pinned_settings()
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(format('SET %s = %L', v.name, v.setting), ' ' ORDER BY v.n)
      FROM pgembed.pinned_setting_values() WITH ORDINALITY AS v(name, setting, n)
$$;

-- The key types whose text is the same in every session: a capture trigger of a table keyed
-- by them needs no pinned settings (and saves their cost on every statement).
CREATE OR REPLACE FUNCTION pgembed.keys_render_alike(p pgembed.pipelines)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT bool_and(t ~ '^(smallint|integer|bigint|text|character varying|character|uuid|boolean|numeric|name|oid)(\(.*\))?$')
      FROM unnest(p.key_types) AS t
$$;

-- A statement that queues at least this many rows of a table with a one-column key leaves
-- one row in pgembed.outbox_statements instead of one outbox row per source row. Below it
-- the per-row outbox insert is as cheap and a worker sees the rows at once. Read when a
-- pipeline's triggers are generated.
CREATE OR REPLACE FUNCTION pgembed.statement_capture_rows()
RETURNS bigint
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 1000::bigint $$;

-- How the capture trigger queues the rows of new_rows that {{filter}} keeps (INSERT: all of
-- them; UPDATE: those whose key is new or whose content columns changed).
CREATE OR REPLACE FUNCTION pgembed.capture_enqueue_sql(p pgembed.pipelines, p_filter text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    per_row text := pgembed.render(
        'PERFORM pgembed.enqueue({{pipeline}}, ARRAY(SELECT {{new_key}} FROM new_rows n {{filter}}));',
        jsonb_build_object('pipeline', quote_literal(p.name), 'filter', p_filter,
                           'new_key', 'jsonb_build_array(' || pgembed.sql_list('n.%1$I::text', p.key_columns) || ')'));
BEGIN
    IF cardinality(p.key_columns) > 1 THEN
        RETURN per_row;  -- composite keys are always queued row by row
    END IF;
    -- a statement of many rows leaves one row of keys; a worker expands it
    RETURN pgembed.render($t$INSERT INTO pgembed.outbox_statements (pipeline, keys, key_count)
        SELECT {{pipeline}}, array_agg(n.{{key_column}}::text), count(*) FROM new_rows n {{filter}}
        HAVING count(*) >= {{statement_rows}};
        IF FOUND THEN
            PERFORM pg_catalog.pg_notify('pgembed', {{pipeline}});
        ELSE
            {{per_row}}
        END IF;$t$,
        jsonb_build_object('pipeline', quote_literal(p.name), 'filter', p_filter, 'per_row', per_row,
                           'key_column', format('%I', p.key_columns[1]),
                           'statement_rows', pgembed.statement_capture_rows()));
END
$$;

-- The columns whose change means the content may have changed: the content's columns, with
-- each virtual generated column among them replaced by the columns its expression reads
-- (a virtual column has no value in a trigger's transition tables: it is NULL there).
CREATE OR REPLACE FUNCTION pgembed.change_columns(p pgembed.pipelines)
RETURNS name[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(DISTINCT x.attname ORDER BY x.attname), '{}')
      FROM (SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = p.source AND a.attname = ANY (p.content_columns) AND a.attgenerated <> 'v'
            UNION
            SELECT b.attname FROM pg_catalog.pg_attribute a
              JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              JOIN pg_catalog.pg_depend dep ON dep.classid = 'pg_catalog.pg_attrdef'::regclass
                                           AND dep.objid = d.oid AND dep.refobjid = a.attrelid
                                           AND dep.refobjsubid > 0 AND dep.refobjsubid <> a.attnum
              JOIN pg_catalog.pg_attribute b ON b.attrelid = a.attrelid AND b.attnum = dep.refobjsubid
             WHERE a.attrelid = p.source AND a.attname = ANY (p.content_columns) AND a.attgenerated = 'v') x
$$;

-- The body of a pipeline's capture trigger function (one function for the four triggers).
CREATE OR REPLACE FUNCTION pgembed.capture_body(p pgembed.pipelines)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keys_n text := '(' || pgembed.sql_list('n.%1$I', p.key_columns) || ')';
    keys_o text := '(' || pgembed.sql_list('o.%1$I', p.key_columns) || ')';
    watched name[] := pgembed.change_columns(p);
    changed text := 'false';
BEGIN
    IF cardinality(watched) > 0 THEN
        changed := format('(%s) IS DISTINCT FROM (%s)',
                          pgembed.sql_list('o.%1$I::text', watched), pgembed.sql_list('n.%1$I::text', watched));
    END IF;
    RETURN pgembed.render($t$
-- generated by pgembed for pipeline id {{id}} (pgembed.pipelines); do not edit
BEGIN
    IF TG_OP = 'INSERT' THEN
        {{enqueue_inserted}}
    ELSIF TG_OP = 'UPDATE' THEN
        -- a key that vanished (primary key changed) is a delete: its vectors go now
        DELETE FROM pgembed.outbox q USING old_rows o
         WHERE q.pipeline = {{pipeline}} AND q.key = {{old_key}}
           AND NOT EXISTS (SELECT 1 FROM new_rows n WHERE {{new_keys}} = {{old_keys}});
        DELETE FROM pgembed.failures q USING old_rows o
         WHERE q.pipeline = {{pipeline}} AND q.key = {{old_key}}
           AND NOT EXISTS (SELECT 1 FROM new_rows n WHERE {{new_keys}} = {{old_keys}});
        DELETE FROM {{destination}} d USING old_rows o
         WHERE {{destination_keys}} = {{old_keys}}
           AND NOT EXISTS (SELECT 1 FROM new_rows n WHERE {{new_keys}} = {{old_keys}});
        {{enqueue_updated}}
    ELSIF TG_OP = 'DELETE' THEN
        -- outbox first: waits for a worker writing these keys, then its vectors go too
        DELETE FROM pgembed.outbox q USING old_rows o WHERE q.pipeline = {{pipeline}} AND q.key = {{old_key}};
        DELETE FROM pgembed.failures q USING old_rows o WHERE q.pipeline = {{pipeline}} AND q.key = {{old_key}};
        DELETE FROM {{destination}} d USING old_rows o WHERE {{destination_keys}} = {{old_keys}};
    ELSIF TG_OP = 'TRUNCATE' AND TG_RELID = {{source_literal}}::regclass THEN
        DELETE FROM pgembed.outbox_statements WHERE pipeline = {{pipeline}};
        DELETE FROM pgembed.outbox WHERE pipeline = {{pipeline}};
        DELETE FROM pgembed.failures WHERE pipeline = {{pipeline}};
        TRUNCATE {{destination}};
    ELSIF TG_OP = 'TRUNCATE' THEN
        -- one partition: forget the keys that are no longer anywhere in the table
        DELETE FROM pgembed.outbox q WHERE q.pipeline = {{pipeline}}
           AND NOT EXISTS (SELECT 1 FROM {{source}} s WHERE {{source_key}} = q.key);
        DELETE FROM pgembed.failures q WHERE q.pipeline = {{pipeline}}
           AND NOT EXISTS (SELECT 1 FROM {{source}} s WHERE {{source_key}} = q.key);
        DELETE FROM {{destination}} d
         WHERE NOT EXISTS (SELECT 1 FROM {{source}} s WHERE {{source_keys}} = {{destination_keys}});
    END IF;
    RETURN NULL;
END
$t$, jsonb_build_object(
        'id', p.id,
        'pipeline', quote_literal(p.name),
        'source_literal', quote_literal(p.source::text),
        'source', p.source::text,
        'source_key', 'jsonb_build_array(' || pgembed.sql_list('s.%1$I::text', p.key_columns) || ')',
        'source_keys', '(' || pgembed.sql_list('s.%1$I', p.key_columns) || ')',
        'destination', format('pgembed.%I', p.destination),
        'old_key', 'jsonb_build_array(' || pgembed.sql_list('o.%1$I::text', p.key_columns) || ')',
        'new_keys', keys_n,
        'old_keys', keys_o,
        'destination_keys', '(' || pgembed.sql_list('d.%1$I', p.key_columns) || ')',
        'enqueue_inserted', pgembed.capture_enqueue_sql(p, ''),
        'enqueue_updated', pgembed.capture_enqueue_sql(p, format(
            'LEFT JOIN old_rows o ON %s = %s WHERE o.%I IS NULL OR %s',
            keys_o, keys_n, p.key_columns[1], changed))));
END
$$;

-- Why a table cannot be a pipeline's source, or NULL when it can: capture needs a table whose
-- every write fires its statement triggers, that outlives the session, and that is not one
-- of pgembed's own (the outbox as a source would queue its own writes forever).
CREATE OR REPLACE FUNCTION pgembed.source_refusal(p_source regclass)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN c.relkind NOT IN ('r', 'p') THEN format('%s is not a table', p_source)
        WHEN c.relpersistence = 't' THEN format('%s is a temporary table, which only its own session sees', p_source)
        WHEN c.relnamespace = 'pgembed'::regnamespace THEN format('%s is one of pgembed''s own tables', p_source)
        WHEN c.relkind = 'r' AND EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhparent = c.oid) THEN
            format('%s has inheritance children: rows written to them never fire its triggers', p_source)
    END
    FROM pg_catalog.pg_class c WHERE c.oid = p_source
$$;

-- Why `current_user` must not read a pipeline's source table now, or NULL when it may. The
-- generated code names the table by the name it had when the code was generated
-- (p_name); if that name no longer resolves to the table the pipeline was created on (the
-- owner renamed it and made a view of the old name, say), reading it would run whatever the
-- view calls. Row-level security that applies to the reader would filter its reads (rows
-- would look deleted and lose their vectors) and run the policies' functions as the reader:
-- pgembed does not read such a table. The owner, a superuser and a BYPASSRLS role are not
-- subject to it (unless FORCE ROW LEVEL SECURITY).
CREATE OR REPLACE FUNCTION pgembed.source_problem(p pgembed.pipelines, p_name text DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN c.oid IS NULL THEN 'its source table was dropped'
        WHEN p_name IS NOT NULL AND to_regclass(p_name) IS DISTINCT FROM c.oid THEN
            format('%s is no longer the table the pipeline was created on (that is now %s)', p_name, c.oid::regclass)
        WHEN c.relrowsecurity AND NOT (r.rolsuper OR r.rolbypassrls
                                       OR (pg_has_role(c.relowner, 'USAGE') AND NOT c.relforcerowsecurity)) THEN
            format('its source table %s has row-level security, which would filter what %s reads and run its '
                   'policies as %s', c.oid::regclass, current_user, current_user)
    END
    FROM (SELECT 1) AS one
    LEFT JOIN pg_catalog.pg_class c ON c.oid = p.source
    LEFT JOIN pg_catalog.pg_roles r ON r.rolname = current_user
$$;

-- The body of a pipeline's reader. It runs with the worker's rights (SECURITY INVOKER). It
-- first checks that the table it names is still the pipeline's own and that no row-level
-- security applies (pgembed.source_problem): otherwise the worker would run code the table's
-- owner controls. Then it evaluates the bound forms of `content` and `cost_center` on
-- search_path pg_catalog: they mean what they meant when the pipeline was created, whatever
-- is created later in a schema of the creator's path, and the worker hashes exactly the text
-- the audit's stale check hashes.
CREATE OR REPLACE FUNCTION pgembed.reader_body(p pgembed.pipelines)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgembed.render($t$
#variable_conflict use_column
-- generated by pgembed for pipeline id {{id}} (pgembed.pipelines); do not edit
DECLARE
    problem text := pgembed.source_problem((SELECT q FROM pgembed.pipelines q WHERE q.id = {{id}}), {{source_name}});
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: pipeline %: %', {{pipeline}}, problem
            USING HINT = 'pgembed reads only the table a pipeline was created on, without row-level security; '
                         'after renaming or moving the table, pgembed init regenerates the pipeline''s code.';
    END IF;
    RETURN QUERY
    SELECT pgembed_keys.key, pgembed_row.found IS NOT NULL,
           pgembed_row.content, pgembed_row.cost_center
    FROM pg_catalog.jsonb_array_elements(keys) AS pgembed_keys(key)
    LEFT JOIN LATERAL (
        SELECT true AS found, ({{content}})::text AS content, ({{cost_center}})::text AS cost_center
        FROM {{source}}
        WHERE ({{key_columns}}) = ({{key_casts}})
    ) AS pgembed_row ON true;
END
$t$, jsonb_build_object(
        'id', p.id,
        'pipeline', quote_literal(p.name),
        'source_name', quote_literal(p.source::text),
        'content', p.content_bound,
        'cost_center', coalesce(p.cost_center_bound, 'NULL'),
        'source', p.source::text,
        'key_columns', pgembed.sql_list('%1$I', p.key_columns),
        'key_casts', pgembed.key_casts(p, 'pgembed_keys.key')))
$$;

-- The body of a pipeline's store: it replaces all chunks of the given keys in one statement
-- pair. The delete finds them through `key column = ANY (array)`, an index scan whatever the
-- statistics say: as a join with unnest() the planner, misjudging the expression's
-- selectivity, chose to hash the whole destination on every batch once it held some 50,000
-- rows. The worker passes full-precision vectors (the cache's); the store narrows them to the
-- pipeline's storage (halfvec), so the worker and the store's signature are one for all.
CREATE OR REPLACE FUNCTION pgembed.store_body(p pgembed.pipelines)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgembed.render($t$
    -- generated by pgembed for pipeline id {{id}} (pgembed.pipelines); do not edit
    DELETE FROM {{destination}} d
     WHERE {{same_keys}};
    INSERT INTO {{destination}} ({{key_columns}}, chunk_seq, chunk, content_hash, chunk_hash, embedding,
                                 truncated)
    SELECT {{key_casts}}, r.seq, r.chunk, r.content_hash, r.chunk_hash, r.embedding::{{embedding_type}},
           coalesce(r.truncated, false)
      FROM unnest(keys, chunk_seqs, chunks, content_hashes, chunk_hashes, embeddings, truncated)
           AS r(key, seq, chunk, content_hash, chunk_hash, embedding, truncated)
     WHERE r.seq IS NOT NULL;
$t$, jsonb_build_object(
        'id', p.id,
        'destination', format('pgembed.%I', p.destination),
        'embedding_type', pgembed.embedding_type(p),
        'key_columns', pgembed.sql_list('%1$I', p.key_columns),
        'key_casts', pgembed.key_casts(p, 'r.key'),
        'same_keys',
        (SELECT string_agg(format('d.%I = ANY (ARRAY(SELECT DISTINCT (k->>%s)::%s FROM unnest(keys) AS k))',
                                  c, i - 1, t), ' AND ' ORDER BY i)
           FROM unnest(p.key_columns, p.key_types) WITH ORDINALITY AS u(c, t, i))
        -- a composite key: the columns' values pair up as they do in the keys
        || CASE WHEN cardinality(p.key_columns) > 1 THEN format(
               ' AND (%s) IN (SELECT %s FROM unnest(keys) AS k)',
               pgembed.sql_list('d.%1$I', p.key_columns), pgembed.key_casts(p, 'k')) ELSE '' END))
$$;

-- The signatures of a pipeline's generated functions, as DDL names them.
CREATE OR REPLACE FUNCTION pgembed.pipeline_functions(p pgembed.pipelines,
                                                      OUT capture text, OUT reader text, OUT store text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('pgembed.%I()', 'p' || p.id || '_capture'),
           format('pgembed.%I(keys jsonb)', 'p' || p.id || '_read'),
           format('pgembed.%I(keys jsonb[], chunk_seqs int[], chunks text[], content_hashes bytea[], '
                  'chunk_hashes bytea[], embeddings %s.vector[], truncated boolean[])', 'p' || p.id || '_store',
                  pgembed.vector_schema())
$$;

-- The tables whose writes a pipeline captures: its source and, when partitioned, every
-- partition under it (PostgreSQL fires a statement trigger only for the table a statement
-- names).
CREATE OR REPLACE FUNCTION pgembed.source_tables(p pgembed.pipelines)
RETURNS TABLE (relid regclass)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.source
    UNION
    SELECT t.relid FROM pg_catalog.pg_partition_tree(p.source) AS t
$$;

-- The tables that carry a pipeline's capture triggers now.
CREATE OR REPLACE FUNCTION pgembed.captured_tables(p pgembed.pipelines)
RETURNS TABLE (relid regclass)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT DISTINCT t.tgrelid::regclass FROM pg_catalog.pg_trigger t
     WHERE t.tgname ~ ('^pgembed_' || p.id || '_(insert|update|delete|truncate)$')
$$;

-- Creates (or replaces) a pipeline's generated functions and creates its triggers where
-- they are missing. Static SQL in each function body means PostgreSQL plans it once per
-- session, not once per statement.
CREATE OR REPLACE FUNCTION pgembed.generate_pipeline_code(p pgembed.pipelines)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f record := pgembed.pipeline_functions(p);
    ev text;
    fn text;
    tbl record;
BEGIN
    EXECUTE format('CREATE OR REPLACE FUNCTION %s RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
                   'SET search_path = pg_catalog, pg_temp %s AS %L', f.capture,
                   CASE WHEN pgembed.keys_render_alike(p) THEN '' ELSE pgembed.pinned_settings() END,
                   pgembed.capture_body(p));
    EXECUTE format('CREATE OR REPLACE FUNCTION %s RETURNS TABLE (key jsonb, found boolean, content text, '
                   'cost_center text) LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp %s AS %L',
                   f.reader, pgembed.pinned_settings(), pgembed.reader_body(p));
    -- a store of an older signature (before the truncated flag) goes: one store per pipeline
    FOR fn IN SELECT q.oid::regprocedure::text FROM pg_catalog.pg_proc q
               WHERE q.pronamespace = 'pgembed'::regnamespace AND q.proname = 'p' || p.id || '_store'
                 AND q.pronargs <> 7 LOOP
        EXECUTE 'DROP FUNCTION ' || fn;
    END LOOP;
    EXECUTE format('CREATE OR REPLACE FUNCTION %s RETURNS void LANGUAGE sql '
                   'SET search_path = pg_catalog, pg_temp %s AS %L', f.store, pgembed.pinned_settings(),
                   pgembed.store_body(p));
    FOREACH fn IN ARRAY ARRAY[f.capture, f.reader, f.store] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
        EXECUTE format('COMMENT ON FUNCTION %s IS %L', fn,
                       format('generated by pgembed for pipeline %s; do not edit', quote_literal(p.name)));
    END LOOP;
    -- A statement fires the statement triggers of the table it names only: a write aimed at
    -- a partition is captured by the partition's own triggers (one function for all).
    FOR tbl IN SELECT * FROM pgembed.captured_tables(p) LOOP
        IF tbl.relid NOT IN (SELECT * FROM pgembed.source_tables(p)) THEN  -- detached, or no longer inherits
            FOREACH ev IN ARRAY '{insert,update,delete,truncate}'::text[] LOOP
                EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'pgembed_' || p.id || '_' || ev, tbl.relid);
            END LOOP;
        END IF;
    END LOOP;
    FOR tbl IN SELECT * FROM pgembed.source_tables(p) LOOP
        FOREACH ev IN ARRAY '{insert,update,delete,truncate}'::text[] LOOP
            CONTINUE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                                   WHERE t.tgrelid = tbl.relid AND t.tgname = 'pgembed_' || p.id || '_' || ev);
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION %s',
                           'pgembed_' || p.id || '_' || ev, upper(ev), tbl.relid,
                           CASE ev WHEN 'insert' THEN 'REFERENCING NEW TABLE AS new_rows'
                                   WHEN 'update' THEN 'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'
                                   WHEN 'delete' THEN 'REFERENCING OLD TABLE AS old_rows'
                                   ELSE '' END,
                           f.capture);
        END LOOP;
    END LOOP;
    PERFORM pgembed.grant_pipeline_to_workers(p);
    PERFORM pgembed.bind_pipeline(p);
END
$$;

-- Brings every pipeline whose source table still exists in line with its table and
-- regenerates its code (pgembed.refresh_pipeline): what an upgrade runs after it replaced
-- the generator, so that every pipeline runs the current code.
CREATE OR REPLACE FUNCTION pgembed.regenerate_all_pipelines()
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    n int := 0;
BEGIN
    FOR p IN SELECT * FROM pgembed.pipelines q
              WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = q.source)
              ORDER BY q.id LOOP
        PERFORM pgembed.refresh_pipeline(p);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- pgembed schema changes: a pipeline follows what the application does to its source table.
--
-- Each pipeline has a binding view, pgembed.p<id>_content (and p<id>_cost_center when it
-- has one): "SELECT (<content>)::text AS pgembed_content FROM <source> WHERE false". It
-- returns no rows; it exists so that PostgreSQL keeps the content bound to the columns it
-- reads, as it keeps any view bound:
--   RENAME COLUMN, RENAME TO, SET SCHEMA   the view follows; so does the pipeline (below)
--   DROP COLUMN / ALTER COLUMN TYPE of a column the content reads
--                                          refused by PostgreSQL, naming the view. To drop
--                                          the column: drop the pipeline first, or CASCADE
--                                          (the pipeline goes with it). To change its type:
--                                          DROP VIEW pgembed.p<id>_content in the same
--                                          transaction, then ALTER: the view comes back
--   ADD COLUMN, a key column's type, other columns
--                                          allowed; followed below
-- After every ALTER TABLE of a source, pgembed.follow_source_ddl (an event trigger, which
-- only a superuser can create: pgembed init creates it when it runs as one) reads the new
-- bound content back from the view, the key from the table, renames or retypes the
-- destination's key columns to match, and regenerates the pipeline's code, in the
-- application's own transaction: its next statement already runs the new code. Without the
-- event trigger, `pgembed init` after a schema change does the same (refresh.sql).
--
-- DROP TABLE: the binding views would refuse it, so they are set aside when a DROP TABLE or
-- DROP SCHEMA starts and put back when it ends. A pipeline whose source is gone keeps its
-- row and its vectors, visibly (pipeline_status: source rows NULL; the audit warns), and its
-- queue is emptied so that no worker tries to read it; drop it with pgembed.drop_pipeline.

-- The binding views of a pipeline, as regclass (NULL where one is missing).
CREATE OR REPLACE FUNCTION pgembed.binding_views(p pgembed.pipelines,
                                                 OUT content regclass, OUT cost_center regclass)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT to_regclass(format('pgembed.%I', 'p' || p.id || '_content')),
           to_regclass(format('pgembed.%I', 'p' || p.id || '_cost_center'))
$$;

-- Creates the binding views that are missing (from the bound forms, which are current).
CREATE OR REPLACE FUNCTION pgembed.bind_pipeline(p pgembed.pipelines)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record := pgembed.binding_views(p);
    what text;
    expression text;
BEGIN
    FOREACH what IN ARRAY '{content,cost_center}'::text[] LOOP
        expression := CASE what WHEN 'content' THEN p.content_bound ELSE p.cost_center_bound END;
        CONTINUE WHEN expression IS NULL
                   OR (what = 'content' AND v.content IS NOT NULL)
                   OR (what = 'cost_center' AND v.cost_center IS NOT NULL);
        EXECUTE format(E'CREATE VIEW pgembed.%I AS SELECT (%s\n)::text AS pgembed_content FROM %s WHERE false',
                       'p' || p.id || '_' || what, expression, p.source);
        EXECUTE format('COMMENT ON VIEW pgembed.%I IS %L', 'p' || p.id || '_' || what,
                       format('pgembed: keeps pipeline %s bound to the columns its %s reads; returns no rows',
                              quote_literal(p.name), what));
    END LOOP;
END
$$;

-- bind_pipeline, or false when the content no longer binds to the table (a column it reads
-- is gone). A binding view dropped by hand, to change the type of a column the content
-- reads, comes back this way after the ALTER TABLE.
CREATE OR REPLACE FUNCTION pgembed.try_bind(p pgembed.pipelines)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgembed.bind_pipeline(p);
    RETURN true;
EXCEPTION WHEN undefined_column OR undefined_function OR undefined_table THEN
    RETURN false;
END
$$;

-- Brings a pipeline in line with its source table as it is now (see the header), and
-- regenerates its code. A no-op for a pipeline whose source is gone.
CREATE OR REPLACE FUNCTION pgembed.refresh_pipeline(p pgembed.pipelines)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v record := pgembed.binding_views(p);
    pk record;
    i int;
    aliased jsonb := '{}';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = p.source) THEN
        RETURN;
    END IF;
    IF v.content IS NOT NULL THEN
        p.content_bound := coalesce(pgembed.view_expression(v.content, p.source), p.content_bound);
        p.content_columns := pgembed.view_columns(v.content, p.source);
    END IF;
    IF v.cost_center IS NOT NULL THEN
        p.cost_center_bound := coalesce(pgembed.view_expression(v.cost_center, p.source), p.cost_center_bound);
    END IF;
    pk := pgembed.primary_key(p.source);
    IF cardinality(pk.columns) = cardinality(p.key_columns) THEN
        aliased := pgembed.alias_views_aside(p.name);  -- a view would block ALTER COLUMN TYPE
        FOR i IN 1 .. cardinality(pk.columns) LOOP
            IF pk.columns[i] <> p.key_columns[i] THEN
                EXECUTE format('ALTER TABLE pgembed.%I RENAME COLUMN %I TO %I',
                               p.destination, p.key_columns[i], pk.columns[i]);
            END IF;
            IF pk.types[i] <> p.key_types[i] THEN
                EXECUTE format('ALTER TABLE pgembed.%I ALTER COLUMN %I TYPE %s USING %I::%s',
                               p.destination, pk.columns[i], pk.types[i], pk.columns[i], pk.types[i]);
            END IF;
        END LOOP;
        p.key_columns := pk.columns;
        p.key_types := pk.types;
    END IF;
    UPDATE pgembed.pipelines q
       SET content_bound = p.content_bound, content_columns = p.content_columns,
           cost_center_bound = p.cost_center_bound, key_columns = p.key_columns, key_types = p.key_types
     WHERE q.id = p.id;
    PERFORM pgembed.alias_views_back(aliased);
    PERFORM pgembed.generate_pipeline_code(p);
END
$$;

-- ddl_command_end of ALTER TABLE: refresh the pipelines of the tables it changed.
CREATE OR REPLACE FUNCTION pgembed.follow_source_ddl()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    before regclass[];
BEGIN
    -- the tables changed, and the tables a new partition (CREATE TABLE ... PARTITION OF)
    -- or an attached one is part of
    FOR p IN SELECT q.* FROM pgembed.pipelines q
              WHERE q.source::oid IN (
                  SELECT a.relid::oid
                    FROM pg_catalog.pg_event_trigger_ddl_commands() c
                   CROSS JOIN LATERAL (SELECT c.objid::regclass AS relid
                                       UNION
                                       SELECT x.relid FROM pg_catalog.pg_partition_ancestors(c.objid::regclass) x) a
                   WHERE c.classid = 'pg_catalog.pg_class'::regclass)
              ORDER BY q.id LOOP
        before := ARRAY(SELECT relid FROM pgembed.captured_tables(p) ORDER BY 1);
        IF (pgembed.binding_views(p)).content IS NULL AND NOT pgembed.try_bind(p) THEN
            -- ... DROP COLUMN ... CASCADE took the binding view, and the content no longer
            -- binds: the pipeline goes with the column
            RAISE NOTICE 'pgembed: pipeline "%" read a column that was dropped with CASCADE; the pipeline is dropped too',
                p.name;
            PERFORM pgembed.drop_pipeline(p.name);
        ELSE
            PERFORM pgembed.refresh_pipeline(p);
            IF before IS DISTINCT FROM ARRAY(SELECT relid FROM pgembed.captured_tables(p) ORDER BY 1) THEN
                -- partitions came or went: rows that joined are queued, rows that left lose
                -- their vectors (the audit's repair, recorded in audit_runs)
                PERFORM pgembed.audit(true, p.name);
            END IF;
        END IF;
    END LOOP;
END
$$;

-- ddl_command_start of DROP TABLE / DROP SCHEMA: the binding views step aside.
CREATE OR REPLACE FUNCTION pgembed.unbind_for_drop()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    views text;
BEGIN
    SELECT string_agg(c.oid::regclass::text, ', ') INTO views
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace = 'pgembed'::regnamespace AND c.relkind = 'v'
       AND c.relname ~ '^p[0-9]+_(content|cost_center)$';
    IF views IS NOT NULL THEN
        EXECUTE 'DROP VIEW ' || views;
    END IF;
END
$$;

-- ddl_command_end of DROP TABLE / DROP SCHEMA: the binding views come back; a pipeline whose
-- source went stops (its queue emptied; its row and vectors kept, visibly).
CREATE OR REPLACE FUNCTION pgembed.rebind_after_drop()
RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
BEGIN
    FOR p IN SELECT * FROM pgembed.pipelines ORDER BY id LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = p.source) THEN
            BEGIN
                PERFORM pgembed.bind_pipeline(p);
            EXCEPTION WHEN OTHERS THEN  -- never the application's DROP that fails because of pgembed
                RAISE WARNING 'pgembed: pipeline "%" could not be bound to its table again: %', p.name, SQLERRM
                    USING HINT = 'pgembed init binds it again once the table is back in shape.';
            END;
        ELSIF EXISTS (SELECT 1 FROM pgembed.outbox o WHERE o.pipeline = p.name)
              OR EXISTS (SELECT 1 FROM pgembed.outbox_statements s WHERE s.pipeline = p.name) THEN
            DELETE FROM pgembed.outbox o WHERE o.pipeline = p.name;
            DELETE FROM pgembed.outbox_statements s WHERE s.pipeline = p.name;
            RAISE NOTICE 'pgembed: the source table of pipeline "%" was dropped; its vectors stay until you drop the pipeline',
                p.name USING HINT = format('SELECT pgembed.drop_pipeline(%L);', p.name);
        END IF;
    END LOOP;
END
$$;

-- The event triggers, when this role may create them (superusers only): re-created by every
-- upgrade; otherwise a NOTICE says that schema changes are followed by `pgembed init`.
DO $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RAISE NOTICE 'pgembed: % is no superuser, so pipelines follow ALTER TABLE and DROP TABLE of their sources only when pgembed init runs again', current_user
            USING HINT = 'Run pgembed init once as a superuser to install the event triggers.';
        RETURN;
    END IF;
    DROP EVENT TRIGGER IF EXISTS pgembed_follow_source_ddl;
    DROP EVENT TRIGGER IF EXISTS pgembed_unbind_for_drop;
    DROP EVENT TRIGGER IF EXISTS pgembed_rebind_after_drop;
    CREATE EVENT TRIGGER pgembed_follow_source_ddl ON ddl_command_end
        WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE') EXECUTE FUNCTION pgembed.follow_source_ddl();
    CREATE EVENT TRIGGER pgembed_unbind_for_drop ON ddl_command_start
        WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA') EXECUTE FUNCTION pgembed.unbind_for_drop();
    CREATE EVENT TRIGGER pgembed_rebind_after_drop ON ddl_command_end
        WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA') EXECUTE FUNCTION pgembed.rebind_after_drop();
END
$$;

-- pgembed outbox: the queue of keys to embed. One rule puts a key in it (pgembed.enqueue),
-- one definition says what state a queued row is in (pgembed.outbox_state), and pgembed.claim
-- leases rows to workers. Keys of statements that changed many rows wait in
-- pgembed.outbox_statements until a claim expands them.
--
-- The states of a key, defined here and used by every view and status line:
--   queued     in the outbox and ready: available_at has come (a lease that expired counts:
--              its worker is gone or too slow, and any worker may claim the row again)
--   in_flight  leased by a worker whose lease has not expired (lease_id set, available_at
--              in the future: the lease's expiry)
--   retrying   failed, backing off: no lease, available_at in the future
--   parked     failed too often: out of the outbox, in pgembed.failures with parked_at set,
--              until a DBA (or the scheduled retry) queues it again
-- The keys of an unexpanded statement (pgembed.outbox_statements) count as queued.

-- No SET clause and qualified operators: PostgreSQL inlines it into the views' counts.
CREATE OR REPLACE FUNCTION pgembed.outbox_state(p_lease_id uuid, p_available_at timestamptz)
RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN p_available_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN 'queued'
                WHEN p_lease_id IS NOT NULL THEN 'in_flight'
                ELSE 'retrying' END
$$;

-- Queues keys of one pipeline: the one rule every path uses (the capture triggers, backfill
-- and repair, the expansion of a statement's keys, retries of failures, the audit). A key
-- not in the outbox is inserted, ready at once, with p_purpose. A key already there is
-- bumped: its version goes up (so a worker holding an older version does not acknowledge
-- it away: the new content gets embedded too), its attempts start again from 0, its
-- purpose stays unless the bump is live ('sync', 'retry') and the key was queued for bulk
-- work (backfill, repair, migration): then it moves to the live lane (see claim_from), or a
-- row the application keeps changing would wait behind the whole backlog; and by state:
--   queued     keeps its place in line (moving it to the back on every change would starve
--              a hot row behind any backlog; leaving the indexed available_at alone lets the
--              bump be a HOT update)
--   retrying   becomes ready now: something changed, so the backoff no longer applies
--   in_flight  keeps its lease untouched: the worker holding it goes on, its acknowledgement
--              sees the newer version and leaves the row queued for the next claim
-- Returns how many keys were queued or bumped, and wakes the workers when there were any.
CREATE OR REPLACE FUNCTION pgembed.enqueue(p_pipeline text, p_keys jsonb[], p_purpose text DEFAULT 'sync',
                                           p_changed_at timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgembed.outbox AS q (pipeline, key, purpose, queued_at, changed_at)
    SELECT p_pipeline, k, p_purpose, p_changed_at, p_changed_at FROM unnest(p_keys) AS k
    ON CONFLICT (pipeline, key) DO UPDATE
       SET version = q.version + 1, attempts = 0,
           -- a live change of a row queued for bulk work (a backfill, a repair, a migration)
           -- moves it to the live lane: the application changed it, it is no longer bulk
           purpose = CASE WHEN excluded.purpose IN ('sync', 'retry') THEN excluded.purpose ELSE q.purpose END,
           changed_at = GREATEST(q.changed_at, excluded.changed_at),
           available_at = CASE pgembed.outbox_state(q.lease_id, q.available_at)
                              WHEN 'in_flight' THEN q.available_at
                              ELSE LEAST(q.available_at, now()) END;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pgembed', p_pipeline);
    END IF;
    RETURN n;
END
$$;

-- Queues every row of a pipeline's source table (backfill, repair).
CREATE OR REPLACE FUNCTION pgembed.queue_all(p_pipeline text, p_purpose text DEFAULT 'backfill')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- the settings of pgembed.pinned_settings(): keys and content render alike everywhere
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
SET bytea_output = 'hex'
SET lc_monetary = 'C'
SET lc_numeric = 'C'
SET lc_time = 'C'
AS $$
DECLARE
    p pgembed.pipelines;
    keys jsonb[];
BEGIN
    SELECT * INTO STRICT p FROM pgembed.pipelines WHERE name = p_pipeline;
    EXECUTE format('SELECT ARRAY(SELECT jsonb_build_array(%s) FROM %s n)',
                   pgembed.sql_list('n.%1$I::text', p.key_columns), p.source)
       INTO keys;
    RETURN pgembed.enqueue(p.name, keys, p_purpose);
END
$$;

-- Moves the keys of a pipeline's pending statements into the outbox, until about p_keys
-- keys have moved, and returns how many did. claim() calls it before it looks for ready
-- rows. A big statement goes in slices (`expanded` counts what has moved), so no claim
-- holds a transaction open for a million-row statement. A statement another worker is
-- expanding is skipped (SKIP LOCKED). Keys are queued by the one rule (pgembed.enqueue), as
-- changed when the statement ran. The insert waits for an application transaction queueing
-- one of the same keys; past a short lock_timeout the statement is left for a later claim,
-- so such a transaction and this one never deadlock.
-- SECURITY DEFINER (EXECUTE for pgembed_worker, see privileges.sql): it only moves keys the
-- triggers wrote, so a worker needs no INSERT on the outbox, which would let it queue rows.
CREATE OR REPLACE FUNCTION pgembed.expand_statements(p_pipeline text, p_keys bigint DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s record;
    n int;
    moved bigint := 0;
    timeout text := current_setting('lock_timeout');
BEGIN
    WHILE moved < p_keys LOOP
        SELECT x.id, x.keys[x.expanded + 1 : x.expanded + (p_keys - moved)::int] AS part,
               x.expanded, x.key_count, x.queued_at
          INTO s
          FROM pgembed.outbox_statements x
         WHERE x.pipeline = p_pipeline
         ORDER BY x.id LIMIT 1
           FOR UPDATE SKIP LOCKED;
        EXIT WHEN NOT FOUND;
        n := coalesce(cardinality(s.part), 0);
        BEGIN
            PERFORM set_config('lock_timeout', '100ms', true);
            PERFORM pgembed.enqueue(p_pipeline, ARRAY(SELECT jsonb_build_array(k) FROM unnest(s.part) AS k),
                                    'sync', s.queued_at);
            IF n = 0 OR s.expanded + n >= s.key_count THEN
                DELETE FROM pgembed.outbox_statements x WHERE x.id = s.id;
            ELSE
                UPDATE pgembed.outbox_statements x SET expanded = x.expanded + n WHERE x.id = s.id;
            END IF;
            PERFORM set_config('lock_timeout', timeout, true);
        EXCEPTION WHEN lock_not_available THEN
            EXIT;  -- the subtransaction's rollback restored lock_timeout
        END;
        moved := moved + n;
    END LOOP;
    RETURN moved;
END
$$;

REVOKE ALL ON FUNCTION pgembed.expand_statements(text, bigint) FROM PUBLIC;

-- Keys of pending statements (one pipeline, or all): queued, though not yet in the outbox.
CREATE OR REPLACE FUNCTION pgembed.statement_keys(p_pipeline text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(sum(s.key_count - s.expanded), 0)::bigint FROM pgembed.outbox_statements s
     WHERE p_pipeline IS NULL OR s.pipeline = p_pipeline
$$;

-- The keys of a batch as the worker sends them, one jsonb array of keys (one document to
-- encode instead of one per key), as the jsonb[] that `key = ANY(...)` takes.
CREATE OR REPLACE FUNCTION pgembed.key_array(p_keys jsonb)
RETURNS jsonb[]
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$ SELECT ARRAY(SELECT jsonb_array_elements(p_keys)) $$;

-- Whether bulk work (backfill, repair, migration rows) may be claimed now: always, unless
-- pgembed.bulk_lane sets a window (opens..closes in its time zone; a window that opens
-- after it closes spans midnight, e.g. 22:00..06:00 off-peak). A DBA sets it with
--     UPDATE pgembed.bulk_lane SET opens = '22:00', closes = '06:00', time_zone = 'Europe/Paris';
CREATE OR REPLACE FUNCTION pgembed.bulk_lane_open(p_at timestamptz DEFAULT now())
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(bool_and(CASE WHEN b.opens IS NULL THEN true
                                  WHEN b.opens < b.closes THEN t.t >= b.opens AND t.t < b.closes
                                  ELSE t.t >= b.opens OR t.t < b.closes END), true)
      FROM pgembed.bulk_lane b
     CROSS JOIN LATERAL (SELECT (p_at AT TIME ZONE b.time_zone)::time AS t) AS t
$$;

-- Claims up to p_limit ready rows of one pipeline for a worker, round robin over pipelines
-- starting after p_after so that no pipeline starves. SKIP LOCKED: workers never wait on
-- each other or on an application transaction that is touching a queued row.
-- Two lanes: live rows (purposes sync and retry: what the application changed) of every
-- pipeline are claimed before any bulk row (backfill, repair, migration), so a row inserted
-- behind a backlog of any pipeline waits one claim, not the backlog; bulk rows are claimed
-- only while the bulk lane is open (pgembed.bulk_lane_open). Each lane is oldest first.
-- claim_from is claim limited to p_only: the pipelines the worker can serve (it checked
-- their provider first), NULL for all; a pipeline created since the worker last looked is
-- not claimed until it has. (A name of its own: an upgrade keeps claim's signature.)
CREATE OR REPLACE FUNCTION pgembed.claim_from(p_worker text, p_lease uuid, p_limit int,
                                              p_lease_seconds double precision, p_after text,
                                              p_only text[])
RETURNS TABLE (pipeline text, key jsonb, version bigint, purpose text, attempts int)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pipes text[];
    pl text;
    lane text;
    ready jsonb[];
BEGIN
    -- A claim need not wait for its commit to reach the disk (a flush is some milliseconds,
    -- a quarter of a small batch's time): one lost in a crash never happened, its rows are
    -- not leased, and the acknowledgement of a lease the database forgot writes nothing but
    -- the cache and the usage it paid for. The acknowledgement's own commit is flushed, and
    -- with it every earlier one.
    PERFORM set_config('synchronous_commit', 'off', true);
    pipes := ARRAY(SELECT q.name FROM pgembed.pipelines q
                    WHERE p_only IS NULL OR q.name = ANY(p_only)
                    ORDER BY q.name <= coalesce(p_after, ''), q.name);
    FOREACH lane IN ARRAY ARRAY['live', 'bulk'] LOOP
        EXIT WHEN lane = 'bulk' AND NOT pgembed.bulk_lane_open();
        FOREACH pl IN ARRAY pipes LOOP
            IF lane = 'live' THEN
                PERFORM pgembed.expand_statements(pl);  -- a statement's keys are live rows
                ready := ARRAY(SELECT o.key FROM pgembed.outbox o  -- through outbox_live
                                WHERE o.pipeline = pl AND o.available_at <= now()
                                  AND o.purpose IN ('sync', 'retry')
                                ORDER BY o.available_at LIMIT p_limit
                                  FOR UPDATE SKIP LOCKED);
            ELSE
                ready := ARRAY(SELECT o.key FROM pgembed.outbox o
                                WHERE o.pipeline = pl AND o.available_at <= now()
                                ORDER BY o.available_at LIMIT p_limit
                                  FOR UPDATE SKIP LOCKED);
            END IF;
            CONTINUE WHEN cardinality(ready) = 0;
            RETURN QUERY
            UPDATE pgembed.outbox o
               SET lease_id = p_lease, leased_by = p_worker,
                   available_at = now() + make_interval(secs => p_lease_seconds)
             WHERE o.pipeline = pl AND o.key = ANY (ready)
            RETURNING o.pipeline, o.key, o.version, o.purpose, o.attempts;
            RETURN;
        END LOOP;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgembed.claim(p_worker text, p_lease uuid, p_limit int,
                                         p_lease_seconds double precision, p_after text DEFAULT '')
RETURNS TABLE (pipeline text, key jsonb, version bigint, purpose text, attempts int)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM pgembed.claim_from(p_worker, p_lease, p_limit, p_lease_seconds, p_after, NULL) $$;

-- Queue depth for metrics and status lines: queued (with the keys of unexpanded
-- statements), in flight, retrying; see pgembed.outbox_state.
CREATE OR REPLACE FUNCTION pgembed.queue_depth(OUT ready bigint, OUT leased bigint, OUT waiting bigint)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*) FILTER (WHERE pgembed.outbox_state(lease_id, available_at) = 'queued')
               + pgembed.statement_keys(),
           count(*) FILTER (WHERE pgembed.outbox_state(lease_id, available_at) = 'in_flight'),
           count(*) FILTER (WHERE pgembed.outbox_state(lease_id, available_at) = 'retrying')
      FROM pgembed.outbox;
$$;

-- The acknowledgement of a batch: everything a worker writes for a batch it embedded, in
-- one statement (one round trip, and no transaction left open between statements, where a
-- paused worker would hold its row locks). In order:
--   1. the new cache entries, whatever else happens (they are paid for), sorted by hash so
--      that two workers storing overlapping sets never deadlock;
--   2. the batch's rows this worker still holds (same lease, lease not expired), locked in
--      key order; rows an application transaction is changing right now are skipped (SKIP
--      LOCKED): they come round again. A worker that lost its lease writes nothing more;
--   3. of the rows held, those still at the version the worker read: their chunks go to the
--      destination through the pipeline's generated store, their outbox rows and old
--      failures go, and the failed ones are recorded with their class (record_failures);
--      rows changed since they were read go back to their place in line, unwritten;
--   4. the usage ledger's rows (p_usage: a jsonb array of objects, one per purpose and
--      cost center).
-- One entry per claimed row: p_keys (one jsonb array of keys, see key_array), p_versions,
-- p_errors (NULL: embedded, or gone). One entry per chunk: p_rows is its row (1-based
-- position in p_keys; NULL for a vector only the cache keeps, e.g. of a row another chunk
-- of which failed); a row that is gone or has no text passes one chunk whose seq is NULL,
-- which makes the store forget its vectors. p_cache_at: the chunks whose hash and vector
-- are new to the cache, with their tokens. p_embeddings is the vector[] the store takes
-- (polymorphic here: pgvector's schema is not on this file's search_path); p_truncated
-- marks the chunks that are the start of a text cut off (chunking 'truncate').
-- Returns the positions (in p_keys) of the rows that had changed and of those not held.
CREATE OR REPLACE FUNCTION pgembed.acknowledge(
    p_pipeline text, p_lease uuid, p_keys jsonb, p_versions bigint[], p_errors text[],
    p_rows int[], p_seqs int[], p_chunks text[], p_content_hashes bytea[], p_chunk_hashes bytea[],
    p_embeddings anyarray, p_truncated boolean[], p_cache_at int[], p_cache_tokens int[], p_model text,
    p_dimensions int,
    p_usage jsonb, p_worker text, p_max_attempts int, p_retry_base double precision,
    OUT changed int[], OUT skipped int[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keys jsonb[] := pgembed.key_array(p_keys);
    current int[];
    good int[];
    bad int[];
BEGIN
    INSERT INTO pgembed.embedding_cache (content_hash, model, dimensions, embedding, tokens)
    SELECT p_chunk_hashes[c.at], p_model, p_dimensions, p_embeddings[c.at], c.tokens
      FROM unnest(p_cache_at, p_cache_tokens) AS c(at, tokens)
     ORDER BY p_chunk_hashes[c.at]
    ON CONFLICT (content_hash) DO NOTHING;

    SELECT coalesce(array_agg(u.i) FILTER (WHERE h.version = u.version), '{}'),
           coalesce(array_agg(u.i) FILTER (WHERE h.version <> u.version), '{}'),
           coalesce(array_agg(u.i) FILTER (WHERE h.key IS NULL), '{}')
      INTO current, changed, skipped
      FROM unnest(keys, p_versions) WITH ORDINALITY AS u(key, version, i)
      LEFT JOIN (SELECT o.key, o.version FROM pgembed.outbox o
                  WHERE o.pipeline = p_pipeline AND o.lease_id = p_lease AND o.available_at > now()
                    AND o.key = ANY (keys)
                  ORDER BY o.key
                    FOR UPDATE SKIP LOCKED) AS h ON h.key = u.key;
    good := ARRAY(SELECT i FROM unnest(current) AS i WHERE p_errors[i] IS NULL);
    bad := ARRAY(SELECT i FROM unnest(current) AS i WHERE p_errors[i] IS NOT NULL);

    IF cardinality(good) > 0 THEN
        PERFORM pgembed.store_chunks(p_pipeline, keys, good, p_rows, p_seqs, p_chunks,
                                     p_content_hashes, p_chunk_hashes, p_embeddings, p_truncated);
        DELETE FROM pgembed.outbox o
         WHERE o.pipeline = p_pipeline AND o.key = ANY (ARRAY(SELECT keys[i] FROM unnest(good) AS i));
        DELETE FROM pgembed.failures f
         WHERE f.pipeline = p_pipeline AND f.key = ANY (ARRAY(SELECT keys[i] FROM unnest(good) AS i));
    END IF;
    IF cardinality(bad) > 0 THEN
        PERFORM pgembed.record_failures(p_pipeline, p_lease, ARRAY(SELECT keys[i] FROM unnest(bad) AS i),
                                        ARRAY(SELECT p_errors[i] FROM unnest(bad) AS i),
                                        p_max_attempts, p_retry_base);
    END IF;
    IF cardinality(changed) > 0 THEN
        -- back to its place in line (when it was first queued), not to the back
        UPDATE pgembed.outbox o
           SET lease_id = NULL, leased_by = NULL, available_at = LEAST(o.queued_at, now())
         WHERE o.pipeline = p_pipeline AND o.lease_id = p_lease
           AND o.key = ANY (ARRAY(SELECT keys[i] FROM unnest(changed) AS i));
    END IF;

    INSERT INTO pgembed.usage (pipeline, model, purpose, cost_center, requests, inputs, tokens,
                               cache_hits, cache_misses, worker)
    SELECT p_pipeline, p_model, u.purpose, u.cost_center, u.requests, u.inputs, u.tokens,
           u.cache_hits, u.cache_misses, p_worker
      FROM jsonb_to_recordset(p_usage) AS u(purpose text, cost_center text, requests int, inputs int,
                                             tokens bigint, cache_hits int, cache_misses int);
END
$$;

-- The chunks of the rows p_good (positions in p_keys) through the pipeline's generated store
-- (pgembed.p<id>_store, named by format('%I')), which replaces every chunk of those keys.
CREATE OR REPLACE FUNCTION pgembed.store_chunks(
    p_pipeline text, p_keys jsonb[], p_good int[], p_rows int[], p_seqs int[], p_chunks text[],
    p_content_hashes bytea[], p_chunk_hashes bytea[], p_embeddings anyarray, p_truncated boolean[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    id bigint := (SELECT q.id FROM pgembed.pipelines q WHERE q.name = p_pipeline);
BEGIN
    EXECUTE format('SELECT pgembed.%I(array_agg($1[u.r]), array_agg(u.seq), array_agg(u.chunk), '
                   'array_agg(u.content_hash), array_agg(u.chunk_hash), array_agg(u.embedding), '
                   'array_agg(u.truncated)) '
                   'FROM unnest($2, $3, $4, $5, $6, $7, $8) '
                   'AS u(r, seq, chunk, content_hash, chunk_hash, embedding, truncated) '
                   'WHERE u.r = ANY ($9)', 'p' || id || '_store')
      USING p_keys, p_rows, p_seqs, p_chunks, p_content_hashes, p_chunk_hashes, p_embeddings, p_truncated,
            p_good;
END
$$;

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

-- pgembed aliases: a name applications search through (`articles`) that outlives the
-- pipeline behind it. Everything that searches by name resolves it here, in one place
-- (pgembed.resolve_pipeline): pgembed.search, Python's search, the Client, the command line.
-- Cutover and rollback repoint an alias with pgembed.set_alias inside their own transaction;
-- a search reads the alias's row as committed before or after, never in between.
--
-- Alias and pipeline names share one namespace: an alias may not take a pipeline's name
-- (set_alias refuses it) nor a pipeline an alias's (pgembed.check_pipeline_name), so a name
-- always means one thing; two sessions creating both at once collide in the catalog (the
-- alias's view and the pipeline's table are both relations of that name in schema pgembed).
-- A pipeline an alias points at cannot be dropped (drop_pipeline).
--
-- Each alias has a view of the same name in schema pgembed: its active pipeline's rows
-- (key columns, chunk_seq, chunk, embedding), for SQL that reads or filters the vectors
-- itself. set_alias rewrites it in the same transaction, keeping the grants made on it.

-- The pipeline a name stands for: an alias's, or a pipeline's own name.
CREATE OR REPLACE FUNCTION pgembed.resolve_pipeline(p_name text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found_name text;
BEGIN
    SELECT a.pipeline INTO found_name FROM pgembed.aliases a WHERE a.name = p_name;
    IF found_name IS NULL THEN
        SELECT q.name INTO found_name FROM pgembed.pipelines q WHERE q.name = p_name;
    END IF;
    IF found_name IS NULL THEN
        RAISE EXCEPTION 'pgembed: no pipeline or alias named %', coalesce(quote_literal(p_name), 'NULL')
            USING HINT = 'pgembed pipeline list and pgembed alias list show them.';
    END IF;
    RETURN found_name;
END
$$;

-- (Re)creates an alias's view over its active pipeline's table, keeping the grants made on
-- it: a view's columns cannot change type in place (another model: other dimensions), so it
-- is made anew. Every upgrade runs it for each alias (the end of this file), so that the
-- sweep of refresh.sql, which drops the views this transaction did not make, keeps them.
-- p_acl: the grants to give it (alias_views_back), else those of the view it replaces.
DROP FUNCTION IF EXISTS pgembed.write_alias_view(text);  -- its first form, before p_acl
CREATE OR REPLACE FUNCTION pgembed.write_alias_view(p_alias text, p_acl aclitem[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    acl aclitem[] := p_acl;
    g record;
BEGIN
    SELECT q.* INTO STRICT p FROM pgembed.aliases a JOIN pgembed.pipelines q ON q.name = a.pipeline
     WHERE a.name = p_alias;
    IF acl IS NULL THEN
        SELECT c.relacl INTO acl FROM pg_catalog.pg_class c
         WHERE c.relnamespace = 'pgembed'::regnamespace AND c.relname = p_alias::name AND c.relkind = 'v';
    END IF;
    EXECUTE format('DROP VIEW IF EXISTS pgembed.%I', p_alias);
    EXECUTE format('CREATE VIEW pgembed.%I AS SELECT %s, d.chunk_seq, d.chunk, d.embedding FROM pgembed.%I d',
                   p_alias, pgembed.sql_list('d.%1$I', p.key_columns), p.destination);
    EXECUTE format('COMMENT ON VIEW pgembed.%I IS %L', p_alias,
                   format('pgembed alias %s: the chunks of pipeline %s', p_alias, p.name));
    IF acl IS NULL THEN
        RETURN;  -- new, or never granted: the owner's rights alone
    END IF;
    FOR g IN SELECT x.grantee, x.privilege_type, x.is_grantable FROM aclexplode(acl) AS x
              WHERE x.grantee <> x.grantor LOOP
        EXECUTE format('GRANT %s ON pgembed.%I TO %s%s', g.privilege_type, p_alias,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$$;

-- A column of a pipeline's table cannot change type under a view: pgembed.refresh_pipeline
-- (a source's primary key renamed or retyped) sets the views of the pipeline's aliases aside
-- first, with their grants, and brings them back over the changed table.
CREATE OR REPLACE FUNCTION pgembed.alias_views_aside(p_pipeline text)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    saved jsonb;
    a text;
BEGIN
    SELECT jsonb_object_agg(x.name, coalesce(c.relacl::text, '')) INTO saved
      FROM pgembed.aliases x
      LEFT JOIN pg_catalog.pg_class c
        ON c.relnamespace = 'pgembed'::regnamespace AND c.relname = x.name::name AND c.relkind = 'v'
     WHERE x.pipeline = p_pipeline;
    FOR a IN SELECT jsonb_object_keys(coalesce(saved, '{}')) LOOP
        EXECUTE format('DROP VIEW IF EXISTS pgembed.%I', a);
    END LOOP;
    RETURN coalesce(saved, '{}');
END
$$;

CREATE OR REPLACE FUNCTION pgembed.alias_views_back(p_saved jsonb)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pgembed.write_alias_view(s.key, nullif(s.value, '')::aclitem[])
      FROM jsonb_each_text(p_saved) s ORDER BY s.key
$$;

-- Creates the alias, or repoints it (previous := the pipeline it pointed at), and rewrites
-- its view. One statement: cutover and rollback call it inside their own transaction.
CREATE OR REPLACE FUNCTION pgembed.set_alias(p_alias text, p_pipeline text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target text;
    old pgembed.aliases;
    kind text;
BEGIN
    IF p_alias IS NULL OR p_alias !~ '[^[:space:]]' OR p_alias ~ '^[[:space:]]|[[:space:]]$'
       OR p_alias ~ '[\u0001-\u001f\u007f-\u009f]' OR octet_length(p_alias) > 63 THEN
        RAISE EXCEPTION 'pgembed: % is not an alias name', coalesce(to_json(p_alias)::text, 'NULL')
            USING HINT = 'An alias name has 1 to 63 bytes, no control characters and no space at either end.';
    END IF;
    IF EXISTS (SELECT 1 FROM pgembed.pipelines q WHERE q.name = p_alias) THEN
        RAISE EXCEPTION 'pgembed: % is the name of a pipeline; an alias needs a name of its own',
            quote_literal(p_alias)
            USING HINT = 'Alias and pipeline names share one namespace: pick another alias name.';
    END IF;
    SELECT q.name INTO target FROM pgembed.pipelines q WHERE q.name = p_pipeline FOR KEY SHARE;
    IF target IS NULL THEN
        RAISE EXCEPTION 'pgembed: no pipeline named %', coalesce(quote_literal(p_pipeline), 'NULL')
            USING HINT = CASE WHEN EXISTS (SELECT 1 FROM pgembed.aliases a WHERE a.name = p_pipeline)
                              THEN 'That is an alias: an alias points at a pipeline, not at another alias.'
                              ELSE 'pgembed pipeline list shows the pipelines.' END;
    END IF;
    -- the row lock orders concurrent repoints of one alias
    SELECT * INTO old FROM pgembed.aliases a WHERE a.name = p_alias FOR UPDATE;
    IF NOT FOUND THEN
        SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' ELSE 'relation' END INTO kind
          FROM pg_catalog.pg_class c
         WHERE c.relnamespace = 'pgembed'::regnamespace AND c.relname = p_alias::name;
        IF kind IS NOT NULL THEN
            RAISE EXCEPTION 'pgembed: alias name % is taken by pgembed''s % pgembed.%', quote_literal(p_alias),
                kind, quote_ident(p_alias)
                USING HINT = 'Each alias has a view of its name in schema pgembed: pick another alias name.';
        END IF;
        INSERT INTO pgembed.aliases (name, pipeline) VALUES (p_alias, target);
    ELSIF old.pipeline <> target THEN
        UPDATE pgembed.aliases a
           SET pipeline = target, previous = old.pipeline, changed_at = now(), changed_by = current_user
         WHERE a.name = p_alias;
    ELSE
        RETURN;  -- already there: nothing changes, not even previous
    END IF;
    PERFORM pgembed.write_alias_view(p_alias);
END
$$;

-- Drops an alias and its view. Applications that search through it get a clear error.
CREATE OR REPLACE FUNCTION pgembed.drop_alias(p_alias text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM pgembed.aliases a WHERE a.name = p_alias;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgembed: no alias named %', coalesce(quote_literal(p_alias), 'NULL')
            USING HINT = 'pgembed alias list shows the aliases.';
    END IF;
    EXECUTE format('DROP VIEW IF EXISTS pgembed.%I', p_alias);
END
$$;

-- The evaluation set an alias's scheduled evaluation re-runs (NULL: none), how often
-- (NULL: never) and the nDCG@10 drop that pgembed.eval_regressions reports.
CREATE OR REPLACE FUNCTION pgembed.set_alias_evaluation(p_alias text, p_eval_set text,
                                                        p_every interval DEFAULT interval '7 days',
                                                        p_threshold double precision DEFAULT 0.02)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_eval_set IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pgembed.eval_sets s WHERE s.name = p_eval_set) THEN
        RAISE EXCEPTION 'pgembed: no evaluation set named %', quote_literal(p_eval_set)
            USING HINT = 'pgembed eval import makes one; pgembed eval sets lists them.';
    END IF;
    IF p_threshold IS NULL OR p_threshold < 0 THEN
        RAISE EXCEPTION 'pgembed: the regression threshold must be 0 or more, not %', coalesce(p_threshold::text, 'NULL')
            USING HINT = 'It is a drop in nDCG@10, for example 0.02.';
    END IF;
    IF p_every <= interval '0' THEN
        RAISE EXCEPTION 'pgembed: an evaluation period must be positive, not %', p_every
            USING HINT = 'For example 7 days; NULL: never.';
    END IF;
    UPDATE pgembed.aliases a SET eval_set = p_eval_set, eval_every = p_every, regression_threshold = p_threshold
     WHERE a.name = p_alias;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgembed: no alias named %', coalesce(quote_literal(p_alias), 'NULL')
            USING HINT = 'pgembed alias list shows the aliases.';
    END IF;
END
$$;

-- Every alias's view, made in this transaction (see write_alias_view).
SELECT pgembed.write_alias_view(a.name) FROM pgembed.aliases a ORDER BY a.name;

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
-- search is exact.

-- Before 0006: no filter.
DROP FUNCTION IF EXISTS pgembed.search(text, real[], int);
DROP FUNCTION IF EXISTS pgembed.nearest_chunks_sql(pgembed.pipelines);

-- The nearest chunks of one pipeline to `query`, best per row: the row's key as a JSON
-- object of its key columns, the chunk that matched and its distance, best first. `filter`
-- (a JSON object, column => value, or => array of values for IN) keeps the rows whose
-- source columns equal it.
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
    -- from the catalog: a caller needs no grant on pgembed's bookkeeping to search
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
    IF p.index_type = 'ivfflat' AND NOT exact THEN
        lists := coalesce(lists, 100);  -- pgvector's default
    END IF;
    -- each row's best chunk, best rows first, and (on every row) how many chunks were read:
    -- fewer than wanted means the table has no more, so a larger read could name no more rows
    nearest := format(
        'SELECT b.key, b.chunk_seq, b.chunk, b.distance, b.read FROM ('
        'SELECT DISTINCT ON (n.key) n.*, count(*) OVER () AS read FROM (%s) AS n '
        'ORDER BY n.key, n.distance, n.chunk_seq) AS b ORDER BY b.distance, b.key LIMIT $3',
        pgembed.nearest_chunks_sql(p, exact, pgembed.search_filter_sql(p, filter)));
    wanted := k * 4;
    LOOP
        PERFORM set_config('hnsw.ef_search', least(1000, greatest(40, wanted, k * coalesce(p.rerank, 0)))::text,
                           true);
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
        IF lists IS NOT NULL THEN
            PERFORM set_config('ivfflat.probes', pgembed.ivfflat_probes(lists, greatest(trained, 1), wanted)::text,
                               true);
            PERFORM set_config('ivfflat.iterative_scan', 'relaxed_order', true);
        END IF;
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
        wanted := wanted * 4;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(keys, seqs, chunks, distances);
END
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

-- pgembed consistency: is every pipeline's destination table in step with its source table?
--
-- A gap is one key of one pipeline that nothing is going to fix by itself:
--   missing   a live source row with no vectors that is neither queued nor failed
--   orphaned  vectors whose source row is gone, and the key is not queued
--   stale     vectors whose stored content_hash is not the hash of the row's current content
--             (sha256 of the content's UTF-8 bytes, as pgembed/cache.py document_hash), not
--             queued and not failed
--   failed    a key parked in pgembed.failures, waiting for a DBA (failures --retry)
-- Rows in the outbox are not gaps: a worker will process them (pipeline_status counts them).
--
-- Gaps are found by comparing the tables themselves, without relying on the outbox having
-- recorded a change, so the audit finds what triggers never saw (triggers disabled, session_replication_role = replica,
-- restores, hand-made edits). Each pipeline has its own source table and content
-- expression, hence per-pipeline dynamic SQL: identifiers come from pgembed.pipelines and
-- the catalogs and go through format('%I'); the only user-written SQL is the content
-- expression, as create_pipeline validated and bound it (content_bound, see gaps() below
-- for why that matters here).
--
-- The source table of a pipeline as a schema-qualified, quoted name, or NULL when it was
-- dropped behind pgembed's back. Qualified explicitly, so that no search_path can make the
-- generated queries read another table of the same name.
CREATE OR REPLACE FUNCTION pgembed.source_name(p pgembed.pipelines)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p.source
$$;

-- The key of a row of alias p_alias as the outbox holds it: the same text the triggers
-- write, jsonb_build_array(col::text, ...).
CREATE OR REPLACE FUNCTION pgembed.key_json_sql(p pgembed.pipelines, p_alias text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'pg_catalog.jsonb_build_array('
           || pgembed.sql_list(quote_ident(p_alias) || '.%1$I::pg_catalog.text', p.key_columns) || ')'
$$;

-- "this key is not queued": not in the outbox, nor in a statement no worker has expanded yet.
CREATE OR REPLACE FUNCTION pgembed.not_queued_sql(p pgembed.pipelines, p_key text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('NOT EXISTS (SELECT 1 FROM pgembed.outbox o WHERE o.pipeline = %1$L AND o.key = %2$s) '
                  'AND NOT EXISTS (SELECT 1 FROM pgembed.outbox_statements b, '
                  'pg_catalog.unnest(b.keys[b.expanded + 1:]) AS bk(key) '
                  'WHERE b.pipeline = %1$L AND pg_catalog.jsonb_build_array(bk.key) = %2$s)', p.name, p_key)
$$;

-- "this key is not parked in pgembed.failures" (nor retrying there).
CREATE OR REPLACE FUNCTION pgembed.not_failed_sql(p pgembed.pipelines, p_key text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('NOT EXISTS (SELECT 1 FROM pgembed.failures f WHERE f.pipeline = %L AND f.key = %s)',
                  p.name, p_key)
$$;

-- The SQL of one gap kind (missing, orphaned, stale) of one pipeline, returning
-- (key jsonb, since timestamptz). Every lookup is an anti-join on an indexed key (on a
-- whole table the planner hashes; for a few rows it probes the index), never a scan per row:
--   destination  PRIMARY KEY (key columns..., chunk_seq); chunk 0 exists for every embedded row
--   source       its primary key
--   outbox       PRIMARY KEY (pipeline, key), key = jsonb array of the key columns as text
--   failures     PRIMARY KEY (pipeline, key)
-- It runs on search_path pg_catalog, pg_temp: what it names itself is qualified, and the
-- stale query evaluates content_bound, whose names were bound when the pipeline was
-- created. pgembed.explain_gaps() shows the plans.
CREATE OR REPLACE FUNCTION pgembed.gap_sql(p pgembed.pipelines, p_kind text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src text := pgembed.source_name(p);
    dest text := format('pgembed.%I', p.destination);
    key_s text := pgembed.key_json_sql(p, 's');
    key_d text := pgembed.key_json_sql(p, 'd');
    same_key text := pgembed.sql_list('d.%1$I = s.%1$I', p.key_columns, ' AND ');
BEGIN
    IF src IS NULL THEN
        RAISE EXCEPTION 'pgembed: the source table of pipeline "%" no longer exists', p.name
            USING HINT = 'Drop the pipeline: SELECT pgembed.drop_pipeline(' || quote_literal(p.name) || ').';
    END IF;
    CASE p_kind
    WHEN 'missing' THEN
        -- nothing records when a row lost (or never got) its vectors: the pipeline's birth
        -- is the best lower bound there is
        RETURN format($q$
SELECT %1$s AS key, %2$L::pg_catalog.timestamptz AS since
  FROM %3$s s
 WHERE NOT EXISTS (SELECT 1 FROM %4$s d WHERE %5$s AND d.chunk_seq = 0)
   AND %6$s
   AND %7$s$q$,
            key_s, p.created_at, src, dest, same_key,
            pgembed.not_queued_sql(p, key_s), pgembed.not_failed_sql(p, key_s));
    WHEN 'empty' THEN
        -- Of the keys in $1 (the missing ones), those whose content is NULL or blank (ASCII
        -- whitespace only, as the worker decides): nothing to embed, so not missing. The rows
        -- are read through the pipeline's own reader, a slice of keys a call, as a worker
        -- reads a batch: the content is evaluated for those rows only (in one query over the
        -- table, the planner may evaluate it for every row first, and a row that raises, a
        -- parked failure, would sink the check), and exactly as the worker evaluates it.
        RETURN format($q$
SELECT r.key, NULL::pg_catalog.timestamptz AS since
  FROM pg_catalog.generate_series(1, pg_catalog.cardinality($1::pg_catalog.jsonb[]), 500) AS slice(first)
 CROSS JOIN LATERAL pgembed.%1$I(pg_catalog.to_jsonb($1[slice.first : slice.first + 499])) AS r
 WHERE r.found AND coalesce(r.content, '') OPERATOR(pg_catalog.!~) E'[^ \t\n\r\f\v]'$q$,
            'p' || p.id || '_read');
    WHEN 'orphaned' THEN
        RETURN format($q$
SELECT %1$s AS key, d.embedded_at AS since
  FROM %2$s d
 WHERE d.chunk_seq = 0
   AND NOT EXISTS (SELECT 1 FROM %3$s s WHERE %4$s)
   AND %5$s$q$,
            key_d, dest, src, same_key, pgembed.not_queued_sql(p, key_d));
    WHEN 'stale' THEN
        -- the content is evaluated in a subquery over the source table alone, unaliased, so
        -- it reads exactly as in the generated reader (columns, even table.column, never
        -- clash with the destination's); the planner flattens the subquery into the join.
        RETURN format($q$
SELECT %1$s AS key, d.embedded_at AS since
  FROM (SELECT %2$s,
               pg_catalog.sha256(pg_catalog.convert_to((%3$s)::pg_catalog.text, 'UTF8'))
                   AS pgembed_current_hash
          FROM %4$s) AS s
  JOIN %5$s d ON %6$s AND d.chunk_seq = 0
 WHERE s.pgembed_current_hash IS DISTINCT FROM d.content_hash
   AND %7$s
   AND %8$s$q$,
            key_s, pgembed.sql_list('%1$I', p.key_columns), p.content_bound, src, dest, same_key,
            pgembed.not_queued_sql(p, key_s), pgembed.not_failed_sql(p, key_s));
    ELSE
        RAISE EXCEPTION 'pgembed: gap kind must be missing, orphaned, stale or empty, not %', p_kind;
    END CASE;
END
$$;

-- The pipelines a call is about: one by name (an unknown name is an error, not an empty
-- answer), or all of them when the name is NULL.
CREATE OR REPLACE FUNCTION pgembed.pipelines_named(p_pipeline text)
RETURNS SETOF pgembed.pipelines
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM pgembed.pipelines q
                  WHERE p_pipeline IS NULL OR q.name = p_pipeline ORDER BY q.name;
    IF NOT FOUND AND p_pipeline IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: no pipeline named "%"', p_pipeline
            USING HINT = 'pgembed pipeline list shows the pipelines.';
    END IF;
END
$$;

-- Every gap of one pipeline, or of all.
--
-- SECURITY DEFINER, so that a DBA in pgembed_reader, who may read the views and nothing
-- else, can read consistency_gaps and pipeline_status without SELECT on the queue, the
-- vectors or the application's tables. EXECUTE is revoked from PUBLIC (privileges.sql grants
-- it to pgembed_reader); the search_path is pinned like everywhere here; row_security is off,
-- so that a source table's row-level security policies (code of the table's owner) never
-- run with our rights: such a table is an error here, not a silent subset.
--
-- The hazard is the stale check: it evaluates a pipeline's content expression, SQL a user
-- wrote, with the rights of pgembed's owner. What makes that safe:
--   * It evaluates content_bound, not content: the expression with every name bound when
--     the pipeline was created (pgembed.probe_expression), on search_path pg_catalog,
--     pg_temp. A function, operator or type planted later in a schema of the creator's
--     search_path (by whoever may create objects there) is never called.
--   * create_pipeline refused anything but one expression over the source table's own
--     columns (no subquery, no other table) calling IMMUTABLE or STABLE functions owned by
--     the creator or a superuser; creating a pipeline needs the owner's rights on schema
--     pgembed anyway.
--   * Before each evaluation, every function it calls (content_functions) must still exist
--     and belong to a superuser or to a role that already has our privileges
--     (pg_has_role(owner, current_user, 'USAGE')): no one else's code may run as us. A
--     function given to another role later, or created by a pipeline creator other than
--     pgembed's owner, stops the stale check of that pipeline with a WARNING that says so;
--     the rest of the answer stands.
--   * The caller gets keys and timestamps. The error text of a failing expression, which
--     may quote row data, only goes to a caller who may read the source table.
-- Left to the owners of types and operators: code they attach to them (a domain's CHECK, an
-- operator dropped and made again over another function) runs with our rights if a content
-- expression uses them; keep those owned by pgembed's owner or a superuser.
--
-- A content expression that raises for some row (a bad cast, division by zero) would sink
-- the whole answer; instead that pipeline's stale check is skipped with a WARNING naming
-- the error. The worker parks such rows in pgembed.failures, where they show as `failed`.
CREATE OR REPLACE FUNCTION pgembed.gaps(p_pipeline text DEFAULT NULL)
RETURNS TABLE (pipeline text, key jsonb, kind text, since timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- the settings of pgembed.pinned_settings(): keys and content render alike everywhere
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
SET bytea_output = 'hex'
SET lc_monetary = 'C'
SET lc_numeric = 'C'
SET lc_time = 'C'
SET row_security = off
AS $$
#variable_conflict use_column
DECLARE
    p pgembed.pipelines;
    problem text;
    untrusted text;
    stale_keys jsonb[];
    stale_since timestamptz[];
    missing_keys jsonb[];
    missing_since timestamptz[];
    empty_keys jsonb[];
BEGIN
    FOR p IN SELECT * FROM pgembed.pipelines_named(p_pipeline) LOOP
        RETURN QUERY
            SELECT p.name, f.key, 'failed'::text, f.first_failed_at
              FROM pgembed.failures f
             WHERE f.pipeline = p.name AND f.parked_at IS NOT NULL;
        problem := pgembed.source_problem(p);
        IF problem IS NOT NULL THEN  -- one such pipeline does not stop the audit of the others
            RAISE WARNING 'pgembed: pipeline "%": not audited: %', p.name, problem
                USING HINT = 'A dropped source: drop the pipeline. Row-level security: see README, "Privileges and roles".';
            CONTINUE;
        END IF;

        RETURN QUERY EXECUTE format('SELECT %L::pg_catalog.text, g.key, %L::pg_catalog.text, g.since FROM (%s) g',
                                    p.name, 'orphaned', pgembed.gap_sql(p, 'orphaned'));
        -- collected first, so that a failing expression leaves no half-returned rows
        stale_keys := NULL;
        stale_since := NULL;
        empty_keys := '{}';
        EXECUTE format('SELECT pg_catalog.array_agg(g.key), pg_catalog.array_agg(g.since) FROM (%s) g',
                       pgembed.gap_sql(p, 'missing'))
           INTO missing_keys, missing_since;
        SELECT string_agg(format('%s (%s)', f.fn, coalesce('owned by ' || pr.proowner::regrole::text,
                                                             'dropped')), ', ')
          INTO untrusted
          FROM unnest(p.content_functions) AS f(fn)
          LEFT JOIN pg_catalog.pg_proc pr ON pr.oid = pg_catalog.to_regprocedure(f.fn)
         WHERE pr.oid IS NULL
            OR NOT (pg_catalog.pg_has_role(pr.proowner, current_user, 'USAGE')
                    OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = pr.proowner));
        IF untrusted IS NOT NULL THEN
            RAISE WARNING 'pgembed: pipeline "%": stale rows not checked: its content expression calls functions that may not run with the rights of %: %',
                p.name, current_user, untrusted
                USING HINT = format('Make %s or a superuser own the function (ALTER FUNCTION ... OWNER TO ...), '
                                    'or create the pipeline again.', current_user);
        ELSE
            BEGIN
                EXECUTE format('SELECT pg_catalog.array_agg(g.key), pg_catalog.array_agg(g.since) '
                               'FROM (%s) g', pgembed.gap_sql(p, 'stale'))
                   INTO stale_keys, stale_since;
            EXCEPTION WHEN OTHERS THEN  -- not a cancel or statement_timeout: those still stop us
                RAISE WARNING 'pgembed: pipeline "%": stale rows not checked, the content expression failed: %',
                    p.name, CASE WHEN pg_catalog.has_table_privilege(session_user, p.source, 'SELECT')
                                 THEN SQLERRM ELSE 'SQLSTATE ' || SQLSTATE END;
            END;
            -- apart, so that a stale check that failed on other rows does not hide empty ones
            BEGIN
                IF missing_keys IS NOT NULL THEN
                    EXECUTE format('SELECT coalesce(pg_catalog.array_agg(g.key), %L) FROM (%s) g',
                                   '{}', pgembed.gap_sql(p, 'empty'))
                       INTO empty_keys USING missing_keys;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'pgembed: pipeline "%": rows with nothing to embed not told apart from missing ones: %',
                    p.name, CASE WHEN pg_catalog.has_table_privilege(session_user, p.source, 'SELECT')
                                 THEN SQLERRM ELSE 'SQLSTATE ' || SQLSTATE END;
            END;
        END IF;
        RETURN QUERY
            SELECT p.name, u.key, 'stale'::text, u.since
              FROM unnest(stale_keys, stale_since) AS u(key, since);
        -- a row with nothing to embed has no vectors, and is not missing them
        RETURN QUERY
            SELECT p.name, u.key, CASE WHEN u.key = ANY (empty_keys) THEN 'empty' ELSE 'missing' END, u.since
              FROM unnest(missing_keys, missing_since) AS u(key, since);
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION pgembed.gaps(text) FROM PUBLIC;

-- EXPLAIN (FORMAT JSON) of each gap query of a pipeline, run the way gaps() runs it: what a
-- DBA reads to check that the anti-joins use the indexes on a big table. Unlike gaps() it
-- runs with the caller's rights (with p_analyze it runs the queries).
CREATE OR REPLACE FUNCTION pgembed.explain_gaps(p_pipeline text, p_analyze boolean DEFAULT false)
RETURNS TABLE (kind text, plan json)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- the settings of pgembed.pinned_settings(): keys and content render alike everywhere
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
SET bytea_output = 'hex'
SET lc_monetary = 'C'
SET lc_numeric = 'C'
SET lc_time = 'C'
AS $$
#variable_conflict use_column
DECLARE
    p pgembed.pipelines;
    k text;
BEGIN
    SELECT * INTO p FROM pgembed.pipelines_named(coalesce(p_pipeline, ''));
    FOREACH k IN ARRAY '{missing,orphaned,stale}'::text[] LOOP
        kind := k;
        EXECUTE format('EXPLAIN (FORMAT JSON, ANALYZE %s) %s', p_analyze::text, pgembed.gap_sql(p, k))
           INTO plan;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Source rows, embedded rows and the last write of one pipeline's tables. SECURITY DEFINER
-- for pipeline_status, like gaps() (EXECUTE for pgembed_reader only); it runs no user-written
-- SQL, only count(*) and max() over tables named from the catalogs.
CREATE OR REPLACE FUNCTION pgembed.pipeline_counts(p_pipeline text,
                                                   OUT source_rows bigint,
                                                   OUT embedded_rows bigint,
                                                   OUT last_embedded_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET row_security = off
AS $$
DECLARE
    p pgembed.pipelines;
    src text;
    problem text;
BEGIN
    SELECT * INTO p FROM pgembed.pipelines_named(coalesce(p_pipeline, ''));
    problem := pgembed.source_problem(p);
    IF problem IS NULL THEN
        src := pgembed.source_name(p);
    ELSE  -- dropped behind pgembed's back, or not readable here: source_rows NULL
        RAISE WARNING 'pgembed: pipeline "%": source rows not counted: %', p.name, problem;
    END IF;
    EXECUTE format('SELECT %s, count(*) FILTER (WHERE d.chunk_seq = 0), max(d.embedded_at) '
                   'FROM pgembed.%I d',
                   coalesce('(SELECT count(*) FROM ' || src || ')', 'NULL'), p.destination)
       INTO source_rows, embedded_rows, last_embedded_at;
END
$$;

REVOKE ALL ON FUNCTION pgembed.pipeline_counts(text) FROM PUBLIC;

-- One row per gap, all pipelines. For one pipeline, SELECT * FROM pgembed.gaps('name')
-- computes only that one.
CREATE OR REPLACE VIEW pgembed.consistency_gaps AS
SELECT g.pipeline, g.key, g.kind, g.since
  FROM pgembed.gaps() AS g
 WHERE g.kind <> 'empty';  -- rows with nothing to embed are no gap (pipeline_status counts them)

-- The health of each pipeline at a glance: row counts, the queue and parked failures live;
-- missing, orphaned and stale as the latest audit found them (gaps_checked_at: when it
-- started; NULL until a first audit of the pipeline). Finding gaps compares every source
-- row with its vectors and hashes its content, seconds per million rows: the scheduler's
-- periodic audit pays that, and consistency_gaps whenever it is read, not a status glance.
-- After a repairing audit those counts are 0: what it found is queued or deleted.
-- The queue splits three ways:
--   queued     ready to be claimed (including leases that expired: a worker died, and the
--              keys of bulk statements that no worker has expanded yet)
--   in_flight  held under a live lease
--   retrying   waiting out the backoff after a failed attempt
-- oldest_gap: how long the oldest unresolved thing (gap or queued row) has waited.
-- failed: parked failures; failed_by_class: the same by class ({"too_long": 3, ...}).
CREATE OR REPLACE VIEW pgembed.pipeline_status AS
SELECT p.name AS pipeline,
       p.model,
       c.source_rows,
       c.embedded_rows,
       q.queued + b.keys AS queued,
       q.in_flight,
       q.retrying,
       f.failed,
       a.missing,
       a.orphaned,
       a.stale,
       now() - LEAST(q.oldest, b.oldest, f.oldest, a.oldest) AS oldest_gap,
       c.last_embedded_at,
       a.checked_at AS gaps_checked_at,
       a.empty,
       f.failed_by_class
  FROM pgembed.pipelines p
 CROSS JOIN LATERAL pgembed.pipeline_counts(p.name) AS c
 CROSS JOIN LATERAL (
       SELECT count(*) FILTER (WHERE pgembed.outbox_state(o.lease_id, o.available_at) = 'queued') AS queued,
              count(*) FILTER (WHERE pgembed.outbox_state(o.lease_id, o.available_at) = 'in_flight') AS in_flight,
              count(*) FILTER (WHERE pgembed.outbox_state(o.lease_id, o.available_at) = 'retrying') AS retrying,
              min(o.queued_at) AS oldest
         FROM pgembed.outbox o
        WHERE o.pipeline = p.name) AS q
 CROSS JOIN LATERAL (
       SELECT coalesce(sum(ob.key_count - ob.expanded), 0) AS keys, min(ob.queued_at) AS oldest
         FROM pgembed.outbox_statements ob
        WHERE ob.pipeline = p.name) AS b
 CROSS JOIN LATERAL (
       SELECT coalesce(sum(n), 0)::bigint AS failed, min(oldest) AS oldest,
              coalesce(jsonb_object_agg(class, n ORDER BY class), '{}') AS failed_by_class
         FROM (SELECT x.class, count(*) AS n, min(x.first_failed_at) AS oldest
                 FROM pgembed.failures x
                WHERE x.pipeline = p.name AND x.parked_at IS NOT NULL
                GROUP BY x.class) AS x) AS f
  LEFT JOIN LATERAL (
       SELECT r.started_at AS checked_at,
              CASE WHEN r.repaired THEN 0 ELSE af.missing END AS missing,
              CASE WHEN r.repaired THEN 0 ELSE af.orphaned END AS orphaned,
              CASE WHEN r.repaired THEN 0 ELSE af.stale END AS stale,
              af.empty,
              CASE WHEN NOT r.repaired THEN af.gaps_since END AS oldest
         FROM pgembed.audit_findings af
         JOIN pgembed.audit_runs r ON r.id = af.run
        WHERE af.pipeline = p.name AND r.finished_at IS NOT NULL AND r.started_at >= p.created_at
        ORDER BY af.run DESC
        LIMIT 1) AS a ON true;

-- Deletes the vectors of orphaned keys, re-checking at delete time that the source row is
-- still gone and the key still not queued (a row re-inserted meanwhile keeps its vectors).
-- Returns how many keys lost their vectors.
CREATE OR REPLACE FUNCTION pgembed.delete_orphans(p pgembed.pipelines, p_keys jsonb[])
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- the settings of pgembed.pinned_settings(): keys and content render alike everywhere
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
SET bytea_output = 'hex'
SET lc_monetary = 'C'
SET lc_numeric = 'C'
SET lc_time = 'C'
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format($q$
        WITH deleted AS (
            DELETE FROM pgembed.%1$I d
             USING pg_catalog.unnest($1) AS k(key)
             WHERE (%2$s) = (%3$s)
               AND NOT EXISTS (SELECT 1 FROM %4$s s WHERE %5$s)
               AND NOT EXISTS (SELECT 1 FROM pgembed.outbox o
                                WHERE o.pipeline = %6$L AND o.key = k.key)
            RETURNING d.chunk_seq)
        SELECT count(*) FROM deleted WHERE chunk_seq = 0$q$,
        p.destination, pgembed.sql_list('d.%1$I', p.key_columns), pgembed.key_casts(p, 'k.key'),
        pgembed.source_name(p), pgembed.sql_list('d.%1$I = s.%1$I', p.key_columns, ' AND '),
        p.name)
       INTO n USING p_keys;
    RETURN n;
END
$$;

-- Audits one pipeline or all, records the run in pgembed.audit_runs and returns it. With
-- p_repair: missing and stale keys are queued (purpose 'repair'; a key queued meanwhile is
-- bumped like a trigger would) and orphaned vectors are deleted. Failed keys are left to a
-- DBA (pgembed failures --retry): the audit does not undo a decision to park a row.
-- The scheduler calls it under an advisory lock; two concurrent runs are still harmless.
CREATE OR REPLACE FUNCTION pgembed.audit(p_repair boolean DEFAULT false, p_pipeline text DEFAULT NULL)
RETURNS pgembed.audit_runs
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    run pgembed.audit_runs;
    p pgembed.pipelines;
    found_ record;
BEGIN
    INSERT INTO pgembed.audit_runs (pipeline, repaired)
    VALUES (p_pipeline, coalesce(p_repair, false))
    RETURNING * INTO run;

    FOR p IN SELECT * FROM pgembed.pipelines_named(p_pipeline) LOOP
        SELECT count(*) FILTER (WHERE g.kind = 'missing') AS missing,
               count(*) FILTER (WHERE g.kind = 'orphaned') AS orphaned,
               count(*) FILTER (WHERE g.kind = 'stale') AS stale,
               count(*) FILTER (WHERE g.kind = 'failed') AS failed,
               count(*) FILTER (WHERE g.kind = 'empty') AS empty,
               min(g.since) FILTER (WHERE g.kind <> 'empty') AS oldest,
               min(g.since) FILTER (WHERE g.kind NOT IN ('failed', 'empty')) AS gaps_since,
               array_agg(g.key) FILTER (WHERE g.kind IN ('missing', 'stale')) AS repairs,
               array_agg(g.key) FILTER (WHERE g.kind = 'orphaned') AS orphans
          INTO found_
          FROM pgembed.gaps(p.name) AS g;

        INSERT INTO pgembed.audit_findings (run, pipeline, missing, orphaned, stale, failed, gaps_since, empty)
        VALUES (run.id, p.name, found_.missing, found_.orphaned, found_.stale, found_.failed,
                found_.gaps_since, found_.empty);
        run.missing := run.missing + found_.missing;
        run.orphaned := run.orphaned + found_.orphaned;
        run.stale := run.stale + found_.stale;
        run.failed := run.failed + found_.failed;
        run.oldest_gap_since := LEAST(run.oldest_gap_since, found_.oldest);
        IF run.repaired AND found_.repairs IS NOT NULL THEN
            run.requeued := run.requeued + pgembed.enqueue(p.name, found_.repairs, 'repair');
        END IF;
        IF run.repaired AND found_.orphans IS NOT NULL THEN
            run.orphans_deleted := run.orphans_deleted + pgembed.delete_orphans(p, found_.orphans);
        END IF;
    END LOOP;

    UPDATE pgembed.audit_runs a
       SET finished_at = clock_timestamp(),
           missing = run.missing, orphaned = run.orphaned, stale = run.stale, failed = run.failed,
           oldest_gap_since = run.oldest_gap_since,
           oldest_gap = run.started_at - run.oldest_gap_since,
           requeued = run.requeued, orphans_deleted = run.orphans_deleted
     WHERE a.id = run.id
    RETURNING * INTO run;
    RETURN run;
END
$$;

-- pgembed worker fleet: heartbeats, scheduled jobs, housekeeping.
--
-- Workers register in pgembed.workers so a DBA sees the fleet in plain SQL next to
-- pg_stat_activity (application_name 'pgembed-worker[<name>]'). Periodic jobs (audit, clean-up,
-- retry of parked failures, index upkeep) run inside the workers; PostgreSQL makes sure
-- each runs once per period however many workers there are: an advisory lock keeps two
-- runs from overlapping, and a unique (job, period_start) keeps a period from running twice.

-- Heartbeat: one upsert per beat; statistics are the worker's totals since it started.
-- p_starting marks the first beat of a process, which resets started_at (a worker name
-- can come back: a fixed --name, or a pid reused after a crash).
CREATE OR REPLACE FUNCTION pgembed.heartbeat(p_name text, p_host text, p_pid int, p_version text,
                                             p_state text, p_concurrency int, p_batches bigint,
                                             p_written bigint, p_removed bigint, p_failed bigint,
                                             p_starting boolean DEFAULT false)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgembed.workers AS w (name, host, pid, version, state, concurrency, batches,
                                      rows_written, rows_removed, rows_failed)
    VALUES (p_name, p_host, p_pid, p_version, p_state, p_concurrency, p_batches, p_written,
            p_removed, p_failed)
    ON CONFLICT (name) DO UPDATE
       SET host = excluded.host, pid = excluded.pid, version = excluded.version,
           state = excluded.state, concurrency = excluded.concurrency,
           batches = excluded.batches, rows_written = excluded.rows_written,
           rows_removed = excluded.rows_removed, rows_failed = excluded.rows_failed,
           started_at = CASE WHEN p_starting THEN now() ELSE w.started_at END,
           last_seen = CASE WHEN p_starting THEN now() ELSE greatest(now(), w.started_at) END;
$$;

-- Workers whose heartbeat stopped more than p_dead_after seconds ago (killed, their host
-- gone): their leases are given back now, not when they expire (minutes later), and their
-- rows in pgembed.workers are marked dead, so that nobody takes them for running and a DBA
-- sees who died and when it was last seen. Dead rows are kept a day. Called by
-- live workers on every heartbeat and while a drain waits. A worker judged dead that was
-- only paused writes nothing when it wakes (every write is fenced by the lease) and is
-- running again with its next beat, as is a new process under the same name. Returns each
-- worker found dead now and its rows.
CREATE OR REPLACE FUNCTION pgembed.release_dead_workers(p_dead_after double precision,
                                                        p_me text DEFAULT NULL)
RETURNS TABLE (worker text, rows bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    dead text;
    n bigint;
BEGIN
    DELETE FROM pgembed.workers w WHERE w.state = 'dead' AND w.last_seen < now() - interval '1 day';
    FOR dead IN
        SELECT w.name FROM pgembed.workers w
         WHERE w.last_seen < now() - make_interval(secs => p_dead_after)
           AND w.state <> 'dead' AND w.name IS DISTINCT FROM p_me
         ORDER BY w.name
           FOR UPDATE SKIP LOCKED
    LOOP
        UPDATE pgembed.outbox o SET lease_id = NULL, leased_by = NULL,
                                    available_at = LEAST(o.queued_at, now())
         WHERE o.leased_by = dead AND o.lease_id IS NOT NULL AND o.available_at > now();
        GET DIAGNOSTICS n = ROW_COUNT;
        UPDATE pgembed.workers w SET state = 'dead' WHERE w.name = dead;
        worker := dead;
        rows := n;
        RETURN NEXT;
    END LOOP;
END
$$;

-- A worker that exits cleanly leaves no row behind.
CREATE OR REPLACE FUNCTION pgembed.worker_exit(p_name text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ DELETE FROM pgembed.workers WHERE name = p_name; $$;


-- Session-level advisory lock of a job: held while the job runs, on the running worker's
-- own connection, so a run that outlasts its period keeps other workers out. The first
-- key is pgembed's namespace, so the locks never collide with the application's.
CREATE OR REPLACE FUNCTION pgembed.try_job_lock(p_job text)
RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_try_advisory_lock(hashtext('pgembed.jobs'), hashtext(p_job)) $$;

CREATE OR REPLACE FUNCTION pgembed.job_unlock(p_job text)
RETURNS boolean
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_advisory_unlock(hashtext('pgembed.jobs'), hashtext(p_job)) $$;

-- Starts a run for the current period, or returns NULL when another worker already ran
-- this period. The period is the database clock rounded to the schedule's grid, so workers
-- whose clocks differ by less than half a period agree on it.
CREATE OR REPLACE FUNCTION pgembed.start_job_run(p_job text, p_worker text, p_every_seconds double precision)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    period timestamptz := to_timestamp(
        round(extract(epoch FROM clock_timestamp()) / p_every_seconds) * p_every_seconds);
    run_id bigint;
BEGIN
    INSERT INTO pgembed.job_runs (job, period_start, worker)
    VALUES (p_job, period, p_worker)
    ON CONFLICT (job, period_start) DO NOTHING
    RETURNING id INTO run_id;
    RETURN run_id;
END
$$;

CREATE OR REPLACE FUNCTION pgembed.finish_job_run(p_id bigint, p_ok boolean, p_detail text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE pgembed.job_runs SET finished_at = clock_timestamp(), ok = p_ok, detail = p_detail
     WHERE id = p_id;
$$;

CREATE OR REPLACE FUNCTION pgembed.upsert_schedule(p_job text, p_every_seconds double precision,
                                                   p_next_run_at timestamptz, p_settings jsonb,
                                                   p_worker text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgembed.schedules AS s (job, every, next_run_at, settings, updated_by)
    VALUES (p_job, make_interval(secs => p_every_seconds), p_next_run_at, p_settings, p_worker)
    ON CONFLICT (job) DO UPDATE
       SET every = excluded.every, next_run_at = excluded.next_run_at,
           settings = excluded.settings, updated_by = excluded.updated_by, updated_at = now();
$$;

-- The audit job: runs pgembed.audit(p_repair) and returns the run's row, as JSON, for
-- job_runs.detail.
CREATE OR REPLACE FUNCTION pgembed.run_scheduled_audit(p_repair boolean DEFAULT false)
RETURNS text
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT to_jsonb(r)::text FROM pgembed.audit(p_repair) AS r $$;

-- Housekeeping: cache entries unused for p_unused_for (at most p_limit per call, so the
-- caller can loop in short transactions), job runs and dead workers' rows past their use.
CREATE OR REPLACE FUNCTION pgembed.clean_cache(p_unused_for interval, p_limit int DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM pgembed.embedding_cache c
     WHERE c.content_hash IN (SELECT content_hash FROM pgembed.embedding_cache
                               WHERE last_used_at < now() - p_unused_for
                               LIMIT p_limit FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION pgembed.prune_service_rows(p_job_runs_kept interval DEFAULT '30 days',
                                                      p_dead_worker_after interval DEFAULT '1 day',
                                                      OUT job_runs bigint, OUT workers bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM pgembed.job_runs WHERE started_at < now() - p_job_runs_kept;
    GET DIAGNOSTICS job_runs = ROW_COUNT;
    DELETE FROM pgembed.workers WHERE last_seen < now() - p_dead_worker_after;
    GET DIAGNOSTICS workers = ROW_COUNT;
END
$$;


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

-- pgembed shared rate limits: one request and token budget per API key, kept here so that
-- every worker, on every host, spends from the same budget. The tables are in schema.sql;
-- functions and views here are CREATE OR REPLACE.
--
-- A bucket is named by the client from the API's base URL and a fingerprint of its key
-- (the first 16 hex digits of sha256(key)): `key:3f2a9c1b7d4e5f60@https://api.openai.com/v1`.
-- The key itself is never sent here. A bucket without a row in pgembed.rate_limits, or
-- with both budgets NULL, is not limited.
--
-- The guarantee: in ANY window of `per_seconds` seconds, at most `max_requests` requests
-- and `max_tokens` tokens are granted, summed over every worker. One row per bucket holds
-- two mechanisms, updated atomically by pgembed.take_budget; the first enforces that
-- guarantee, the second spreads the budget out:
--
-- * A sliding window kept as 61 slots of per_seconds/60 each (a ring of counts): a grant
--   needs the last 61 slots plus the request within the budget. Any window of per_seconds
--   lies inside 61 consecutive slots, so no window ever exceeds the budget; the price is
--   that sustained throughput is 60/61 of it.
-- * A pacer (a leaky bucket) that spreads the budget out in time: it holds at most
--   `burst_seconds` worth of budget and drains at budget/per_seconds. Without it a backlog
--   would spend a minute's budget in the first second, and APIs that enforce their
--   per-minute limit over shorter periods answer that with 429s.
--
-- A request bigger than the whole budget would never fit: it is granted when it would be
-- alone, i.e. when nothing else was granted in the window and the pacer is empty (the same
-- rule lets a request bigger than the pacer's burst through). It is then the only request
-- of its window, over the budget by itself (the API decides whether to accept it), and the
-- pacer holds what follows back until the average is within the budget again. Nothing
-- deadlocks on it.
--
-- Nothing waits inside PostgreSQL: take_budget locks one row for microseconds and returns
-- how long the caller should sleep before asking again (0: granted, and already counted).
-- There is no queue: under contention, whoever asks first after budget frees up gets it, so
-- a big request can wait longer than small ones. Time is clock_timestamp() of the database
-- server, the one clock every worker shares.
--
-- A worker role needs: USAGE ON SCHEMA pgembed, SELECT ON pgembed.rate_limits, SELECT,
-- INSERT, UPDATE ON pgembed.rate_limit_state (take_budget runs with the caller's rights).

-- Create or change a budget, with an error a person can act on; returns the row.
CREATE OR REPLACE FUNCTION pgembed.set_rate_limit(
    p_bucket text,
    p_max_requests int,
    p_max_tokens bigint,
    p_per_seconds double precision DEFAULT 60,
    p_burst_seconds double precision DEFAULT 1,
    p_base_url text DEFAULT NULL,
    p_key_fingerprint text DEFAULT NULL)
RETURNS pgembed.rate_limits
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r pgembed.rate_limits;
BEGIN
    IF p_bucket IS NULL OR length(p_bucket) NOT BETWEEN 1 AND 500 THEN
        RAISE EXCEPTION 'pgembed: a rate-limit bucket needs a name of 1 to 500 characters';
    END IF;
    IF p_max_requests IS NOT NULL AND p_max_requests <= 0 THEN
        RAISE EXCEPTION 'pgembed: invalid budget for %: max_requests must be > 0, not % (NULL: no limit)',
            p_bucket, p_max_requests;
    END IF;
    IF p_max_tokens IS NOT NULL AND p_max_tokens <= 0 THEN
        RAISE EXCEPTION 'pgembed: invalid budget for %: max_tokens must be > 0, not % (NULL: no limit)',
            p_bucket, p_max_tokens;
    END IF;
    IF p_per_seconds IS NULL OR NOT (p_per_seconds BETWEEN 0.1 AND 86400) THEN
        RAISE EXCEPTION 'pgembed: invalid budget for %: per_seconds must be 0.1 to 86400, not %',
            p_bucket, coalesce(p_per_seconds::text, 'NULL')
            USING HINT = 'A budget of requests per minute has per_seconds = 60.';
    END IF;
    IF p_burst_seconds IS NULL OR NOT (p_burst_seconds > 0 AND p_burst_seconds <= 86400) THEN
        RAISE EXCEPTION 'pgembed: invalid budget for %: burst_seconds must be > 0, not %',
            p_bucket, coalesce(p_burst_seconds::text, 'NULL')
            USING HINT = 'burst_seconds is how many seconds'' worth of budget may be spent at once.';
    END IF;
    IF p_key_fingerprint IS NOT NULL AND p_key_fingerprint !~ '^[0-9a-f]{16}$' THEN
        RAISE EXCEPTION 'pgembed: a key fingerprint is 16 lower-case hex digits (sha256 of the key); '
                        'never store the key itself';
    END IF;
    INSERT INTO pgembed.rate_limits AS l
        (bucket, max_requests, max_tokens, per_seconds, burst_seconds, base_url, key_fingerprint)
    VALUES (p_bucket, p_max_requests, p_max_tokens, p_per_seconds, p_burst_seconds, p_base_url,
            p_key_fingerprint)
    ON CONFLICT (bucket) DO UPDATE
        SET max_requests = EXCLUDED.max_requests,
            max_tokens = EXCLUDED.max_tokens,
            per_seconds = EXCLUDED.per_seconds,
            burst_seconds = EXCLUDED.burst_seconds,
            base_url = coalesce(EXCLUDED.base_url, l.base_url),
            key_fingerprint = coalesce(EXCLUDED.key_fingerprint, l.key_fingerprint),
            updated_at = pg_catalog.now()
    RETURNING * INTO r;
    RETURN r;
END
$$;

-- Ask for `p_requests` requests carrying `p_tokens` tokens. Returns 0 when granted (and
-- counted), else the seconds to wait before asking again. One row lock, no waiting inside.
CREATE OR REPLACE FUNCTION pgembed.take_budget(p_bucket text, p_requests int, p_tokens bigint)
RETURNS double precision
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n CONSTANT int := 60;      -- slots per window
    m CONSTANT int := 61;      -- slots in the ring: a window spans at most n + 1 of them
    lim pgembed.rate_limits;
    st pgembed.rate_limit_state;
    now_s double precision;
    slot double precision;
    k bigint;
    rs bigint[];
    ts bigint[];
    used bigint;
    need bigint;
    freed bigint;
    budget double precision;
    rate double precision;
    cap double precision;
    rl double precision;
    tl double precision;
    cost double precision;
    lvl double precision;
    w double precision;
    wait double precision := 0;
BEGIN
    IF p_requests IS NULL OR p_requests < 0 OR p_tokens IS NULL OR p_tokens < 0 THEN
        RAISE EXCEPTION 'pgembed: take_budget needs requests >= 0 and tokens >= 0, not % and %',
            coalesce(p_requests::text, 'NULL'), coalesce(p_tokens::text, 'NULL');
    END IF;
    SELECT * INTO lim FROM pgembed.rate_limits WHERE bucket = p_bucket;
    IF NOT FOUND OR (lim.max_requests IS NULL AND lim.max_tokens IS NULL) THEN
        RETURN 0;
    END IF;
    slot := lim.per_seconds / n;

    SELECT * INTO st FROM pgembed.rate_limit_state WHERE bucket = p_bucket FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        -- an empty ring: slot 0 is long gone, so the first move forward clears everything
        INSERT INTO pgembed.rate_limit_state
            (bucket, slot_seconds, head_slot, request_slots, token_slots, paced_at)
        VALUES (p_bucket, slot, 0, array_fill(0::bigint, ARRAY[m]), array_fill(0::bigint, ARRAY[m]), 0)
        ON CONFLICT (bucket) DO NOTHING;
        SELECT * INTO STRICT st FROM pgembed.rate_limit_state WHERE bucket = p_bucket FOR NO KEY UPDATE;
    END IF;
    -- The time of the grant is read once the row is ours: the lock may have been waited for.
    now_s := extract(epoch FROM pg_catalog.clock_timestamp())::double precision;
    k := floor(now_s / slot)::bigint;
    rs := st.request_slots;
    ts := st.token_slots;

    IF st.slot_seconds <> slot THEN
        -- per_seconds changed: keep what was granted, all of it in the newest slot, so that
        -- it still counts for a whole window (never less than the truth).
        rs := array_fill(0::bigint, ARRAY[m]);
        ts := array_fill(0::bigint, ARRAY[m]);
        rs[(k % m) + 1] := (SELECT coalesce(sum(v), 0) FROM unnest(st.request_slots) v);
        ts[(k % m) + 1] := (SELECT coalesce(sum(v), 0) FROM unnest(st.token_slots) v);
        st.head_slot := k;
        st.slot_seconds := slot;
    END IF;

    -- Move the ring forward to slot k, emptying the slots that left the window.
    IF k > st.head_slot THEN
        IF k - st.head_slot >= m THEN
            rs := array_fill(0::bigint, ARRAY[m]);
            ts := array_fill(0::bigint, ARRAY[m]);
        ELSE
            FOR d IN 1 .. (k - st.head_slot)::int LOOP
                rs[((st.head_slot + d) % m) + 1] := 0;
                ts[((st.head_slot + d) % m) + 1] := 0;
            END LOOP;
        END IF;
        st.head_slot := k;
    ELSE
        k := st.head_slot;  -- the clock stepped back: stay on the newest slot
    END IF;

    -- The pacer drains at budget / per_seconds.
    rl := st.request_level;
    tl := st.token_level;
    IF now_s > st.paced_at THEN
        IF lim.max_requests IS NOT NULL THEN
            rl := greatest(0, rl - (now_s - st.paced_at) * lim.max_requests / lim.per_seconds);
        END IF;
        IF lim.max_tokens IS NOT NULL THEN
            tl := greatest(0, tl - (now_s - st.paced_at) * lim.max_tokens / lim.per_seconds);
        END IF;
        st.paced_at := now_s;
    END IF;

    FOR dim IN 1 .. 2 LOOP
        IF dim = 1 THEN
            budget := lim.max_requests; cost := p_requests; lvl := rl;
            used := (SELECT coalesce(sum(v), 0) FROM unnest(rs) v);
        ELSE
            budget := lim.max_tokens; cost := p_tokens; lvl := tl;
            used := (SELECT coalesce(sum(v), 0) FROM unnest(ts) v);
        END IF;
        CONTINUE WHEN budget IS NULL OR cost = 0;

        -- Window: wait for the oldest slots to leave it until the request fits; a request
        -- bigger than the budget waits until the window is empty.
        need := CASE WHEN cost <= budget THEN used + cost::bigint - budget::bigint ELSE used END;
        IF need > 0 THEN
            freed := 0;
            FOR j IN 0 .. n LOOP
                freed := freed + CASE WHEN dim = 1 THEN rs[((k - n + j) % m) + 1]
                                      ELSE ts[((k - n + j) % m) + 1] END;
                IF freed >= need THEN
                    -- slot k - n + j leaves the window when slot k + 1 + j begins
                    wait := greatest(wait, (k + 1 + j) * slot - now_s, 0.001);
                    EXIT;
                END IF;
            END LOOP;
        END IF;

        -- Pacer: room for the request, or empty for one bigger than the pacer holds.
        rate := budget / lim.per_seconds;
        cap := budget * least(lim.burst_seconds, lim.per_seconds) / lim.per_seconds;
        w := CASE WHEN cost <= cap THEN (lvl + cost - cap) / rate ELSE lvl / rate END;
        IF w > 1e-6 THEN
            wait := greatest(wait, w);
        END IF;
    END LOOP;

    IF wait > 0 THEN
        UPDATE pgembed.rate_limit_state
           SET slot_seconds = st.slot_seconds, head_slot = st.head_slot, request_slots = rs,
               token_slots = ts, request_level = rl, token_level = tl, paced_at = st.paced_at,
               waits = waits + 1
         WHERE bucket = p_bucket;
        RETURN wait;
    END IF;

    rs[(k % m) + 1] := rs[(k % m) + 1] + p_requests;
    ts[(k % m) + 1] := ts[(k % m) + 1] + p_tokens;
    UPDATE pgembed.rate_limit_state
       SET slot_seconds = st.slot_seconds, head_slot = st.head_slot, request_slots = rs,
           token_slots = ts,
           request_level = CASE WHEN lim.max_requests IS NULL THEN 0 ELSE rl + p_requests END,
           token_level = CASE WHEN lim.max_tokens IS NULL THEN 0 ELSE tl + p_tokens END,
           paced_at = st.paced_at,
           granted_requests = granted_requests + p_requests,
           granted_tokens = granted_tokens + p_tokens,
           last_grant_at = pg_catalog.clock_timestamp()
     WHERE bucket = p_bucket;
    RETURN 0;
END
$$;

-- What a ring holds for the window that ends now (slots that left it may not be emptied yet).
CREATE OR REPLACE FUNCTION pgembed.rate_limit_window_sum(p_slots bigint[], p_head bigint,
                                                         p_slot_seconds double precision)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(sum(v), 0)::bigint
    FROM unnest(p_slots) WITH ORDINALITY AS u(v, i)
    -- index i holds slot number head - ((head - (i - 1)) % 61); in the window if >= now - 60
    WHERE p_head - ((p_head - (i - 1)) % 61)
          >= floor(extract(epoch FROM clock_timestamp())::double precision / p_slot_seconds)::bigint - 60
$$;

-- Budgets and what is being spent of them, one row per bucket.
CREATE OR REPLACE VIEW pgembed.rate_limit_status AS
SELECT l.bucket,
       l.base_url,
       l.key_fingerprint,
       l.max_requests,
       l.max_tokens,
       l.per_seconds,
       l.burst_seconds,
       coalesce(pgembed.rate_limit_window_sum(s.request_slots, s.head_slot, s.slot_seconds), 0)
           AS window_requests,
       coalesce(pgembed.rate_limit_window_sum(s.token_slots, s.head_slot, s.slot_seconds), 0)
           AS window_tokens,
       coalesce(s.granted_requests, 0) AS granted_requests,
       coalesce(s.granted_tokens, 0) AS granted_tokens,
       coalesce(s.waits, 0) AS waits,
       s.last_grant_at,
       l.updated_at
FROM pgembed.rate_limits l
LEFT JOIN pgembed.rate_limit_state s ON s.bucket = l.bucket;

-- A bulk request's grant (backfill, repair, migration batches): from a bucket of its own
-- that holds pgembed.bulk_lane.rate_share of the key's budget, then from the key's bucket
-- as any request. So bulk work never takes more than its share, and live requests always
-- have the rest. The share's bucket ('bulk ' and the key's bucket) follows the key's
-- budget at every call. SECURITY DEFINER: it keeps that row, which a worker may not write.
CREATE OR REPLACE FUNCTION pgembed.take_bulk_budget(p_bucket text, p_requests int, p_tokens bigint)
RETURNS double precision
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    share double precision := (SELECT b.rate_share FROM pgembed.bulk_lane b);
    lim pgembed.rate_limits;
    held text := 'bulk ' || left(p_bucket, 495);
    wait double precision;
BEGIN
    SELECT * INTO lim FROM pgembed.rate_limits r WHERE r.bucket = p_bucket;
    IF coalesce(share, 1) < 1 AND (lim.max_requests IS NOT NULL OR lim.max_tokens IS NOT NULL) THEN
        INSERT INTO pgembed.rate_limits AS r (bucket, max_requests, max_tokens, per_seconds, burst_seconds, base_url)
        VALUES (held, ceil(lim.max_requests * share)::int, ceil(lim.max_tokens * share)::bigint, lim.per_seconds,
                lim.burst_seconds, lim.base_url)
        ON CONFLICT (bucket) DO UPDATE
           SET max_requests = excluded.max_requests, max_tokens = excluded.max_tokens,
               per_seconds = excluded.per_seconds, burst_seconds = excluded.burst_seconds, updated_at = now()
         WHERE (r.max_requests, r.max_tokens, r.per_seconds, r.burst_seconds)
               IS DISTINCT FROM (excluded.max_requests, excluded.max_tokens, excluded.per_seconds,
                                 excluded.burst_seconds);
        wait := pgembed.take_budget(held, p_requests, p_tokens);
        IF wait > 0 THEN
            RETURN wait;
        END IF;
    END IF;
    RETURN pgembed.take_budget(p_bucket, p_requests, p_tokens);
END
$$;

REVOKE ALL ON FUNCTION pgembed.take_bulk_budget(text, int, bigint) FROM PUBLIC;

-- pgembed model migrations: moving an alias from one model to another without a moment in
-- which its searches fail or come back empty. Five phases, each a function here (the
-- command line is `pgembed migrate …`, pgembed/model_migrations.py):
--   plan      pgembed.migration_target: what the dry run needs (the estimate itself counts
--             tokens with the new model's tokenizer, in Python: pgembed/estimate.py)
--   start     pgembed.start_migration: a shadow pipeline on the same source and content with
--             the new model; from then on every live change is embedded by both, and its
--             backfill is queued under purpose 'migration' (the bulk lane, see claim_from)
--   evaluate  pgembed.migration_evaluated records the runs of the alias's evaluation set
--             against both pipelines (pgembed.evaluation.runs)
--   cutover   pgembed.cutover_migration: the gate (metrics, missing and stale rows), then the
--             alias points at the shadow; the old pipeline stays live, the rollback target
--   rollback  pgembed.rollback_migration, within the window; cleanup
--             (pgembed.cleanup_migration, by hand or pgembed.cleanup_due_migrations from
--             the scheduler) drops the pipeline the alias no longer uses
-- Every phase is a row of pgembed.model_migration_events, with who.

-- The alias's open migration (not cleaned up), locked, or else its latest one; NULL when
-- the alias never had one. An alias that does not exist is an error.
CREATE OR REPLACE FUNCTION pgembed.alias_migration(p_alias text)
RETURNS pgembed.model_migrations
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations;
BEGIN
    PERFORM pgembed.active_pipeline(p_alias);
    SELECT * INTO m FROM pgembed.model_migrations x
     WHERE x.alias = p_alias
     ORDER BY x.phase = 'cleaned_up', x.id DESC
     LIMIT 1
       FOR UPDATE;
    RETURN m;
END
$$;

-- The pipeline an alias points at, locked (a migration's phases are one at a time). A name
-- that is a pipeline's, not an alias's, is refused with what to do: migrations move aliases.
CREATE OR REPLACE FUNCTION pgembed.active_pipeline(p_alias text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    active text;
BEGIN
    SELECT a.pipeline INTO active FROM pgembed.aliases a WHERE a.name = p_alias FOR UPDATE;
    IF FOUND THEN
        RETURN active;
    END IF;
    IF EXISTS (SELECT 1 FROM pgembed.pipelines p WHERE p.name = p_alias) THEN
        RAISE EXCEPTION 'pgembed: ''%'' is a pipeline, not an alias; a migration moves an alias', p_alias
            USING HINT = format('Give the pipeline an alias first: SELECT pgembed.set_alias(''NAME'', %L); '
                                'searches through the alias then follow the migration.', p_alias);
    END IF;
    RAISE EXCEPTION 'pgembed: no alias named ''%''', p_alias
        USING HINT = 'SELECT name, pipeline FROM pgembed.aliases shows the aliases.';
END
$$;

-- The size a backfill of model m would store: p_dimensions, checked, else the model's own.
CREATE OR REPLACE FUNCTION pgembed.target_dimensions(m pgembed.models, p_dimensions int)
RETURNS int
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    dims int := coalesce(p_dimensions, m.dimensions);
BEGIN
    IF dims < 1 OR dims > m.dimensions OR (dims <> m.dimensions AND NOT m.shortenable) THEN
        RAISE EXCEPTION 'pgembed: model % cannot give % dimensions', m.model, dims
            USING HINT = format('Leave dimensions out for the model''s own %s.', m.dimensions);
    END IF;
    RETURN dims;
END
$$;

-- What a dry run needs to make the worker's chunks: the source and its bound content, the
-- model, its size and price and limits, and the chunking create_pipeline would choose.
CREATE OR REPLACE FUNCTION pgembed.model_target(p_source regclass, p_content_bound text, p_prefixed boolean,
                                                m pgembed.models, p_dimensions int, p_chunking text,
                                                p_chunk_tokens int, p_chunk_overlap int)
RETURNS TABLE (source regclass, content_bound text, prefixed boolean, model text, dimensions int,
               native_dimensions int, chunking text, chunk_tokens int, chunk_overlap int, tokenizer text,
               usd_per_1m_tokens numeric, max_input_tokens int, max_batch_inputs int, max_batch_tokens int)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_source, p_content_bound, p_prefixed, m.model, p_dimensions, m.dimensions, c.chunking,
           c.chunk_tokens, c.chunk_overlap, m.tokenizer, m.usd_per_1m_tokens, m.max_input_tokens,
           m.max_batch_inputs, m.max_batch_tokens
      FROM pgembed.chunking_settings(m, p_chunking, p_chunk_tokens, p_chunk_overlap) AS c
$$;

-- What a migration of p_alias to p_model would build, checked: the active pipeline, its
-- source and bound content, and the new pipeline's model, size and chunking (as
-- create_pipeline will choose them: fitted to the new model), with the model's price and
-- limits. The dry run (pgembed migrate plan) reads the rows through this.
CREATE OR REPLACE FUNCTION pgembed.migration_target(p_alias text, p_model text, p_dimensions int DEFAULT NULL)
RETURNS TABLE (active text, source regclass, content_bound text, prefixed boolean, model text,
               dimensions int, native_dimensions int, chunking text, chunk_tokens int,
               chunk_overlap int, tokenizer text, usd_per_1m_tokens numeric, max_input_tokens int,
               max_batch_inputs int, max_batch_tokens int)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    m pgembed.models;
    running pgembed.model_migrations;
    dims int;
BEGIN
    SELECT * INTO STRICT p FROM pgembed.pipelines q WHERE q.name = pgembed.active_pipeline(p_alias);
    running := pgembed.alias_migration(p_alias);
    IF running.phase IS NOT NULL AND running.phase <> 'cleaned_up' THEN
        RAISE EXCEPTION 'pgembed: alias ''%'' has a migration in progress (#%, %, to %)', p_alias,
            running.id, running.phase, running.to_model
            USING HINT = 'Finish it first: pgembed migrate cutover, rollback or cleanup ' || p_alias || '.';
    END IF;
    IF p_model IS NULL THEN
        RAISE EXCEPTION 'pgembed: a migration needs the model to migrate to, not NULL';
    END IF;
    m := pgembed.model_info(p_model);
    dims := pgembed.target_dimensions(m, p_dimensions);
    IF m.model = p.model AND dims = p.dimensions THEN
        RAISE EXCEPTION 'pgembed: alias ''%'' already uses % at % dimensions (pipeline %)', p_alias, m.model,
            dims, p.name;
    END IF;
    RETURN QUERY SELECT p.name, t.* FROM pgembed.model_target(p.source, p.content_bound, p.chunk_prefix IS NOT NULL,
                                                              m, dims, NULL, NULL, NULL) AS t;
END
$$;

-- The dry run of create_pipeline(..., backfill => true): what pipeline create --dry-run
-- reads the rows through. The arguments are create_pipeline's and are checked the same way
-- (content bound on the caller's schemas); nothing is created.
CREATE OR REPLACE FUNCTION pgembed.backfill_target_on_path(p_path text, p_source regclass, p_content text,
                                                           p_model text, p_dimensions int, p_chunking text,
                                                           p_chunk_tokens int, p_chunk_overlap int,
                                                           p_chunk_prefix text)
RETURNS TABLE (source regclass, content_bound text, prefixed boolean, model text, dimensions int,
               native_dimensions int, chunking text, chunk_tokens int, chunk_overlap int, tokenizer text,
               usd_per_1m_tokens numeric, max_input_tokens int, max_batch_inputs int, max_batch_tokens int)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    refusal text := pgembed.source_refusal(p_source);
    m pgembed.models := pgembed.model_info(p_model);
    bound text;
BEGIN
    IF refusal IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: %', refusal;
    END IF;
    IF p_content IS NULL THEN
        RAISE EXCEPTION 'pgembed: content must be a SQL expression over the columns of %, not NULL', p_source;
    END IF;
    IF p_chunk_prefix IS NOT NULL THEN
        PERFORM pgembed.probe_expression(p_source, p_chunk_prefix, p_path, 'chunk_prefix');
    END IF;
    SELECT e.bound INTO bound
      FROM pgembed.probe_expression(p_source, CASE WHEN p_chunk_prefix IS NULL THEN p_content
                                                   ELSE pgembed.prefixed_content(p_chunk_prefix, p_content) END,
                                    p_path, p_bind => true) AS e;
    RETURN QUERY SELECT * FROM pgembed.model_target(p_source, bound, p_chunk_prefix IS NOT NULL, m,
                                                    pgembed.target_dimensions(m, p_dimensions), p_chunking,
                                                    p_chunk_tokens, p_chunk_overlap);
END
$$;

-- No SET clause, as create_pipeline: it reads the content on the caller's own schemas.
CREATE OR REPLACE FUNCTION pgembed.backfill_target(p_source regclass, p_content text, p_model text,
                                                   p_dimensions int DEFAULT NULL, p_chunking text DEFAULT NULL,
                                                   p_chunk_tokens int DEFAULT NULL, p_chunk_overlap int DEFAULT NULL,
                                                   p_chunk_prefix text DEFAULT NULL)
RETURNS TABLE (source regclass, content_bound text, prefixed boolean, model text, dimensions int,
               native_dimensions int, chunking text, chunk_tokens int, chunk_overlap int, tokenizer text,
               usd_per_1m_tokens numeric, max_input_tokens int, max_batch_inputs int, max_batch_tokens int)
LANGUAGE sql
AS $$
    SELECT * FROM pgembed.backfill_target_on_path(
        (SELECT coalesce(pg_catalog.string_agg(pg_catalog.quote_ident(s), ', ' ORDER BY i), 'pg_catalog')
           FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) WITH ORDINALITY AS u(s, i)
          WHERE NOT pg_catalog.starts_with(s, 'pg_temp')),
        $1, $2, $3, $4, $5, $6, $7, $8)
$$;

CREATE OR REPLACE FUNCTION pgembed.migration_event(p_migration bigint, p_event text, p_detail jsonb DEFAULT '{}')
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgembed.model_migration_events (migration, event, detail) VALUES (p_migration, p_event, p_detail)
$$;

-- Starts a migration: the shadow pipeline (same source, content, chunk prefix, cost center,
-- index and storage as the active one; chunking fitted to the new model), whose backfill is
-- queued under purpose 'migration'; the alias keeps pointing at the active pipeline.
-- p_estimate is the dry run's result, kept to compare the spend with. Returns the id.
CREATE OR REPLACE FUNCTION pgembed.start_migration(p_alias text, p_model text, p_dimensions int DEFAULT NULL,
                                                   p_estimate jsonb DEFAULT '{}', p_name text DEFAULT NULL,
                                                   p_max_drop numeric DEFAULT 3,
                                                   p_window interval DEFAULT '48 hours')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    p pgembed.pipelines;
    shadow text;
    new_id bigint;
BEGIN
    IF p_max_drop IS NULL OR p_max_drop < 0 THEN
        RAISE EXCEPTION 'pgembed: the gate''s max_drop must be 0 or more points, not %', coalesce(p_max_drop::text, 'NULL');
    END IF;
    IF p_window IS NULL OR p_window <= interval '0' THEN
        RAISE EXCEPTION 'pgembed: the rollback window must be positive, not %', coalesce(p_window::text, 'NULL');
    END IF;
    SELECT * INTO STRICT t FROM pgembed.migration_target(p_alias, p_model, p_dimensions);
    SELECT * INTO STRICT p FROM pgembed.pipelines q WHERE q.name = t.active;
    shadow := pgembed.create_pipeline_on_path(
        p.search_path, p.source, p.content, t.model, t.dimensions, p.index_type, p.index_options, p.distance,
        cost_center => p.cost_center, name => p_name, chunk_prefix => p.chunk_prefix, storage => p.storage,
        quantization => p.quantization, rerank => p.rerank);
    -- create_pipeline queued the rows as a backfill (and deferred a large one's HNSW index);
    -- it held the source locked since, so these are all of the shadow's rows
    UPDATE pgembed.outbox o SET purpose = 'migration' WHERE o.pipeline = shadow;
    INSERT INTO pgembed.model_migrations (alias, from_pipeline, to_pipeline, from_model, to_model, to_dimensions,
                                          estimate, max_drop, rollback_window)
    VALUES (p_alias, p.name, shadow, p.model, t.model, t.dimensions, coalesce(p_estimate, '{}'), p_max_drop,
            p_window)
    RETURNING model_migrations.id INTO new_id;
    PERFORM pgembed.migration_event(new_id, 'started', jsonb_build_object('from', p.name, 'to', shadow,
                                                                      'model', t.model, 'dimensions', t.dimensions));
    RETURN new_id;
END
$$;

-- The open migration of an alias in one of p_phases, locked; otherwise an error that says
-- what state it is in and what can be done instead.
CREATE OR REPLACE FUNCTION pgembed.migration_in(p_alias text, p_phases text[], p_doing text)
RETURNS pgembed.model_migrations
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations := pgembed.alias_migration(p_alias);
BEGIN
    IF m.id IS NULL THEN
        RAISE EXCEPTION 'pgembed: alias ''%'' has no migration to %', p_alias, p_doing
            USING HINT = 'pgembed migrate start ' || p_alias || ' --model MODEL begins one.';
    END IF;
    IF m.phase = ANY (p_phases) THEN
        RETURN m;
    END IF;
    RAISE EXCEPTION 'pgembed: cannot % migration #% of alias ''%'': it is %', p_doing, m.id, p_alias,
        CASE m.phase
            WHEN 'started' THEN 'not cut over yet'
            WHEN 'cut_over' THEN format('cut over already (at %s)', m.cut_over_at)
            WHEN 'rolled_back' THEN 'rolled back'
            ELSE format('cleaned up (at %s)', m.finished_at) END
        USING HINT = CASE m.phase
            WHEN 'started' THEN 'pgembed migrate cutover ' || p_alias || ' first.'
            WHEN 'cut_over' THEN 'pgembed migrate rollback ' || p_alias || ' goes back; cleanup ends it.'
            WHEN 'rolled_back' THEN 'pgembed migrate cleanup ' || p_alias || ' drops the shadow.'
            ELSE 'It is over; pgembed migrate start ' || p_alias || ' --model MODEL begins another.' END;
END
$$;

-- Records an evaluation of both pipelines (pgembed.eval_runs ids) for the gate.
CREATE OR REPLACE FUNCTION pgembed.migration_evaluated(p_alias text, p_eval_set text, p_active_run bigint,
                                                       p_shadow_run bigint)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations := pgembed.migration_in(p_alias, '{started}', 'evaluate');
BEGIN
    UPDATE pgembed.model_migrations x SET eval_set = p_eval_set WHERE x.id = m.id;
    PERFORM pgembed.migration_event(m.id, 'evaluated', jsonb_build_object(
        'eval_set', p_eval_set, 'active_run', p_active_run, 'shadow_run', p_shadow_run));
    RETURN m.id;
END
$$;

-- What stands between a migration and its cutover: per metric of the latest evaluation of
-- the active pipeline, the shadow's more than max_drop points below it; the shadow's
-- missing (its backfill not done, or failed) and stale rows. jsonb: {"failed": [{metric, active, shadow, points}], "missing",
-- "stale", "evaluated"}.
CREATE OR REPLACE FUNCTION pgembed.cutover_gate(m pgembed.model_migrations)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    active jsonb;
    shadow jsonb;
    failed jsonb;
    gaps record;
BEGIN
    SELECT r.metrics INTO active FROM pgembed.eval_runs r
     WHERE r.pipeline = m.from_pipeline AND r.eval_set = m.eval_set AND r.at >= m.started_at
     ORDER BY r.id DESC LIMIT 1;
    SELECT r.metrics INTO shadow FROM pgembed.eval_runs r
     WHERE r.pipeline = m.to_pipeline AND r.eval_set = m.eval_set AND r.at >= m.started_at
     ORDER BY r.id DESC LIMIT 1;
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'metric', a.key, 'active', a.value::numeric, 'shadow', (shadow ->> a.key)::numeric,
               'points', round((a.value::numeric - coalesce((shadow ->> a.key)::numeric, 0)) * 100, 2))
               ORDER BY a.key), '[]')
      INTO failed
      FROM jsonb_each_text(coalesce(active, '{}')) AS a
     WHERE (a.value::numeric - coalesce((shadow ->> a.key)::numeric, 0)) * 100 > m.max_drop;
    -- missing: what the audit calls missing or failed, and the backfill still queued (a live
    -- change queued now is no reason to wait: both pipelines embed it)
    SELECT count(*) FILTER (WHERE g.kind IN ('missing', 'failed'))
           + (SELECT count(*) FROM pgembed.outbox o
               WHERE o.pipeline = m.to_pipeline AND o.purpose IN ('backfill', 'repair', 'migration')) AS missing,
           count(*) FILTER (WHERE g.kind = 'stale') AS stale
      INTO gaps
      FROM pgembed.gaps(m.to_pipeline) AS g;
    RETURN jsonb_build_object('failed', failed, 'missing', gaps.missing, 'stale', gaps.stale,
                              'evaluated', active IS NOT NULL AND shadow IS NOT NULL,
                              'max_drop', m.max_drop);
END
$$;

-- Cutover: the alias points at the shadow, if the gate lets it (or p_force, with a reason:
-- recorded with who). A refusal is recorded too, and returned: {"cut_over": false, ...the
-- gate}. The old pipeline stays, in sync, as the rollback target.
CREATE OR REPLACE FUNCTION pgembed.cutover_migration(p_alias text, p_force boolean DEFAULT false,
                                                     p_reason text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations := pgembed.migration_in(p_alias, '{started}', 'cut over');
    gate jsonb := pgembed.cutover_gate(m);
    passed boolean := jsonb_array_length(gate -> 'failed') = 0 AND (gate ->> 'missing')::bigint = 0
                      AND (gate ->> 'stale')::bigint = 0 AND (gate ->> 'evaluated')::boolean;
BEGIN
    IF coalesce(p_force, false) AND nullif(btrim(coalesce(p_reason, '')), '') IS NULL THEN
        RAISE EXCEPTION 'pgembed: a forced cutover needs a reason'
            USING HINT = 'pgembed migrate cutover ' || p_alias || ' --force --reason "why"';
    END IF;
    IF NOT passed AND NOT coalesce(p_force, false) THEN
        PERFORM pgembed.migration_event(m.id, 'cutover_refused', gate);
        RETURN gate || jsonb_build_object('cut_over', false, 'migration', m.id);
    END IF;
    gate := gate || jsonb_build_object('forced', NOT passed, 'reason', p_reason);
    PERFORM pgembed.set_alias(p_alias, m.to_pipeline);
    UPDATE pgembed.model_migrations x SET phase = 'cut_over', cut_over_at = now() WHERE x.id = m.id;
    PERFORM pgembed.migration_event(m.id, 'cut_over', gate);
    RETURN gate || jsonb_build_object('cut_over', true, 'migration', m.id);
END
$$;

-- Rollback, within the window: the alias points at the old pipeline again, at once.
CREATE OR REPLACE FUNCTION pgembed.rollback_migration(p_alias text)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations := pgembed.migration_in(p_alias, '{cut_over}', 'roll back');
BEGIN
    IF now() > m.cut_over_at + m.rollback_window THEN
        RAISE EXCEPTION 'pgembed: the rollback window of migration #% of alias ''%'' ended at %', m.id, p_alias,
            m.cut_over_at + m.rollback_window
            USING HINT = 'Migrate back instead: pgembed migrate start ' || p_alias || ' --model ' || m.from_model;
    END IF;
    PERFORM pgembed.set_alias(p_alias, m.from_pipeline);
    UPDATE pgembed.model_migrations x SET phase = 'rolled_back' WHERE x.id = m.id;
    PERFORM pgembed.migration_event(m.id, 'rolled_back', jsonb_build_object('to', m.from_pipeline));
    RETURN m.id;
END
$$;

-- Cleanup: drops the pipeline the alias does not use (after a cutover the old one, after a
-- rollback or before any cutover the shadow) and its vectors. Returns the dropped name.
CREATE OR REPLACE FUNCTION pgembed.cleanup_migration(p_alias text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations := pgembed.migration_in(p_alias, '{started,cut_over,rolled_back}', 'clean up');
    unused text := CASE m.phase WHEN 'cut_over' THEN m.from_pipeline ELSE m.to_pipeline END;
BEGIN
    IF EXISTS (SELECT 1 FROM pgembed.pipelines q WHERE q.name = unused) THEN
        PERFORM pgembed.drop_pipeline(unused);
    END IF;
    UPDATE pgembed.model_migrations x SET phase = 'cleaned_up', finished_at = now() WHERE x.id = m.id;
    PERFORM pgembed.migration_event(m.id, 'cleaned_up', jsonb_build_object('dropped', unused, 'after', m.phase));
    RETURN unused;
END
$$;

-- The scheduled cleanup: every migration whose rollback window is over. Returns how many.
CREATE OR REPLACE FUNCTION pgembed.cleanup_due_migrations()
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a text;
    n int := 0;
BEGIN
    FOR a IN SELECT x.alias FROM pgembed.model_migrations x
              WHERE x.phase IN ('cut_over', 'rolled_back') AND x.cut_over_at + x.rollback_window < now()
              ORDER BY x.id LOOP
        PERFORM pgembed.cleanup_migration(a);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- Each migration with its progress: the shadow's rows still queued (outbox and unexpanded
-- statements), what the migration has spent so far (usage of purpose 'migration') beside
-- the estimate, an ETA from the pace so far, and until when rollback is possible.
CREATE OR REPLACE VIEW pgembed.model_migration_status AS
SELECT m.id,
       m.alias,
       m.phase,
       m.from_pipeline,
       m.to_pipeline,
       m.to_model,
       (m.estimate ->> 'rows')::bigint AS rows,
       q.queued,
       greatest(coalesce((m.estimate ->> 'rows')::bigint, 0) - q.queued, 0) AS done,
       u.tokens,
       u.usd,
       (m.estimate ->> 'tokens')::bigint AS estimated_tokens,
       (m.estimate ->> 'usd')::numeric AS estimated_usd,
       CASE WHEN q.queued = 0 THEN interval '0'
            WHEN coalesce((m.estimate ->> 'rows')::bigint, 0) > q.queued
            THEN (now() - m.started_at) * (q.queued::double precision
                                           / ((m.estimate ->> 'rows')::bigint - q.queued)) END AS eta,
       m.started_at,
       m.started_by,
       m.cut_over_at,
       m.cut_over_at + m.rollback_window AS rollback_until,
       m.finished_at
  FROM pgembed.model_migrations m
 CROSS JOIN LATERAL (
       SELECT ((SELECT count(*) FROM pgembed.outbox o WHERE o.pipeline = m.to_pipeline)
              + (SELECT coalesce(sum(s.key_count - s.expanded), 0) FROM pgembed.outbox_statements s
                  WHERE s.pipeline = m.to_pipeline))::bigint AS queued) AS q
 CROSS JOIN LATERAL (
       SELECT coalesce(sum(c.tokens), 0)::bigint AS tokens, coalesce(sum(c.usd), 0) AS usd
         FROM pgembed.usage_cost c
        WHERE c.pipeline = m.to_pipeline AND c.purpose = 'migration' AND c.at >= m.started_at) AS u;

-- pgembed comments: what `\d+ pgembed.<table>` says about each table and its columns.
-- Re-applied by every upgrade, so a better sentence needs no migration revision.

COMMENT ON SCHEMA pgembed IS 'pgembed: embeddings of ordinary rows, kept in step by triggers, an outbox and workers';

COMMENT ON TABLE pgembed.models IS 'Embedding models: dimensions, API limits, price. INSERT a row to register an OpenAI-compatible model; hash:N needs none';
COMMENT ON COLUMN pgembed.models.shortenable IS 'true when the model can return fewer dimensions (Matryoshka)';
COMMENT ON COLUMN pgembed.models.max_input_tokens IS 'longest input the model takes, in its own tokens';
COMMENT ON COLUMN pgembed.models.max_batch_inputs IS 'most inputs in one embedding request';
COMMENT ON COLUMN pgembed.models.max_batch_tokens IS 'most tokens in one embedding request';
COMMENT ON COLUMN pgembed.models.usd_per_1m_tokens IS 'price; the cost views read it, so an edit applies to past usage too';
COMMENT ON COLUMN pgembed.models.short_name IS 'used in destination table names';
COMMENT ON COLUMN pgembed.models.tokenizer IS 'how chunks are counted: cl100k, model (a local model''s own), NULL (cl100k, a quarter of the window kept free)';

COMMENT ON TABLE pgembed.pipelines IS 'One row per pipeline: a source table, a content expression, a model, a destination table';
COMMENT ON COLUMN pgembed.pipelines.content IS 'the content expression as the creator wrote it';
COMMENT ON COLUMN pgembed.pipelines.content_columns IS 'columns the content reads: an UPDATE queues a row only if one of them changed';
COMMENT ON COLUMN pgembed.pipelines.content_bound IS 'content with every name bound (deparsed on search_path pg_catalog): what workers and the audit evaluate';
COMMENT ON COLUMN pgembed.pipelines.content_functions IS 'functions the content calls (regprocedure)';
COMMENT ON COLUMN pgembed.pipelines.cost_center IS 'expression naming who pays for a row''s embedding, or NULL';
COMMENT ON COLUMN pgembed.pipelines.cost_center_bound IS 'cost_center bound like content_bound';
COMMENT ON COLUMN pgembed.pipelines.destination IS 'table pgembed.<destination> holds the vectors: key columns, chunk_seq, chunk, hashes, embedding';
COMMENT ON COLUMN pgembed.pipelines.key_columns IS 'the source''s primary key columns, in key order';
COMMENT ON COLUMN pgembed.pipelines.key_types IS 'their SQL types';
COMMENT ON COLUMN pgembed.pipelines.chunk_tokens IS '0: no chunking; else tokens per chunk, in the model''s tokens (cl100k for chunking tokens)';
COMMENT ON COLUMN pgembed.pipelines.chunking IS 'recursive, markdown, tokens (cl100k windows), truncate (start only, flagged) or none (too long fails)';
COMMENT ON COLUMN pgembed.pipelines.chunk_prefix IS 'expression embedded at the head of every chunk of a row, as given (content_bound carries it)';
COMMENT ON COLUMN pgembed.pipelines.storage IS 'vector (4-byte floats, indexed up to 2,000 dimensions) or halfvec (2-byte floats, up to 4,000)';
COMMENT ON COLUMN pgembed.pipelines.quantization IS 'none, or binary: the HNSW index holds binary_quantize(embedding), searches re-rank by the stored vectors';
COMMENT ON COLUMN pgembed.pipelines.rerank IS 'a binary-quantized search reads rerank times as many candidates as it returns';
COMMENT ON COLUMN pgembed.pipelines.late_chunking IS 'each chunk''s vector pools its own tokens of one run of the model over the whole document (local models)';
COMMENT ON COLUMN pgembed.pipelines.search_path IS 'the creator''s search_path, on which content and cost_center were read';

COMMENT ON TABLE pgembed.outbox IS 'Keys to embed, one row per (pipeline, key); see pgembed.outbox_state for the states of a row';
COMMENT ON COLUMN pgembed.outbox.key IS 'primary key values as a jsonb array of text';
COMMENT ON COLUMN pgembed.outbox.version IS 'bumped by every change; an acknowledgement removes the row only if the version it embedded is still current';
COMMENT ON COLUMN pgembed.outbox.purpose IS 'why it was queued: sync (a change), backfill, repair, retry, migration';
COMMENT ON COLUMN pgembed.outbox.queued_at IS 'when the key was first queued';
COMMENT ON COLUMN pgembed.outbox.changed_at IS 'when the key last changed';
COMMENT ON COLUMN pgembed.outbox.available_at IS 'claimable from then on: a lease''s expiry while leased, the end of a backoff while retrying';
COMMENT ON COLUMN pgembed.outbox.attempts IS 'failures since the last change';
COMMENT ON COLUMN pgembed.outbox.lease_id IS 'the claim that holds the row (with leased_by), NULL when not leased';
COMMENT ON COLUMN pgembed.outbox.leased_by IS 'name of the worker holding the lease (pgembed.workers.name)';

COMMENT ON TABLE pgembed.outbox_statements IS 'Keys of one application statement that queued many rows, expanded into the outbox by a worker''s claim';
COMMENT ON COLUMN pgembed.outbox_statements.keys IS 'the keys, as text (one-column primary keys only)';
COMMENT ON COLUMN pgembed.outbox_statements.expanded IS 'keys[1:expanded] are in the outbox already';

COMMENT ON TABLE pgembed.failure_classes IS 'The kinds of failure and the retry policy of each: attempts before parking, whether the scheduled job retries parked rows';
COMMENT ON COLUMN pgembed.failure_classes.park_after IS 'attempts before a row is parked; NULL: the worker''s --max-attempts';
COMMENT ON COLUMN pgembed.failure_classes.auto_retry IS 'whether the scheduled retry job re-queues parked rows of this class by itself';
COMMENT ON TABLE pgembed.failures IS 'Rows that could not be embedded: retried with backoff, parked (parked_at set) after as many attempts as their class allows';
COMMENT ON COLUMN pgembed.failures.class IS 'what kind of failure (pgembed.failure_classes), from its message (pgembed.failure_class)';
COMMENT ON COLUMN pgembed.failures.parked_at IS 'set once the row left the queue; pgembed failures --retry queues it again';

COMMENT ON TABLE pgembed.embedding_cache IS 'Embeddings by content hash (sha256 of model, dimensions, text): one row serves every pipeline that embeds the same text';
COMMENT ON COLUMN pgembed.embedding_cache.last_used_at IS 'updated at most hourly on a hit; the clean-up job deletes entries unused for long';

COMMENT ON TABLE pgembed.usage IS 'One row per batch a worker finished or query embedded: requests, tokens, cache hits; spend is computed in the cost views';

COMMENT ON TABLE pgembed.audit_runs IS 'One row per consistency audit: the gaps it found (before any repair) and what it repaired';
COMMENT ON TABLE pgembed.audit_findings IS 'What each audit run found per pipeline; pipeline_status reads the latest';
COMMENT ON COLUMN pgembed.audit_findings.empty IS 'live rows whose content is NULL or blank: nothing to embed, not a gap';

COMMENT ON TABLE pgembed.workers IS 'Workers, upserted by their heartbeat; state dead: its heartbeat stopped, its leases were given back (kept a day); pg_stat_activity.application_name is pgembed-<role>[<name>]';
COMMENT ON TABLE pgembed.schedules IS 'Periodic jobs the workers run, and when each runs next';
COMMENT ON TABLE pgembed.job_runs IS 'One row per run of a periodic job; finished_at NULL with an old started_at: interrupted';
COMMENT ON TABLE pgembed.index_builds IS 'IVFFlat indexes a worker trained: rows and lists at the time';
COMMENT ON TABLE pgembed.deferred_indexes IS 'HNSW indexes put off until a large backfill is embedded';
COMMENT ON TABLE pgembed.rate_limits IS 'Request and token budgets per API key (bucket), shared by every worker';
COMMENT ON TABLE pgembed.rate_limit_state IS 'The moving part of each limited bucket (sliding window and pacer)';

-- Stable search names and evaluation
COMMENT ON TABLE pgembed.aliases IS 'Names applications search through; each points at one pipeline (pgembed.set_alias repoints it)';
COMMENT ON COLUMN pgembed.aliases.previous IS 'the pipeline it pointed at before its last repoint (what a rollback returns to)';
COMMENT ON COLUMN pgembed.aliases.eval_set IS 'the evaluation set the scheduler re-runs on this alias (NULL: none)';
COMMENT ON COLUMN pgembed.aliases.eval_every IS 'how often the scheduler re-runs eval_set (NULL: never)';
COMMENT ON COLUMN pgembed.aliases.regression_threshold IS 'a drop in nDCG@10 beyond this, run to run, is listed in eval_regressions';
COMMENT ON TABLE pgembed.eval_sets IS 'Evaluation sets: queries with judged rows of one source table';
COMMENT ON COLUMN pgembed.eval_sets.origin IS 'the file format it was imported from: beir (queries JSONL + qrels TSV) or jsonl';
COMMENT ON TABLE pgembed.eval_queries IS 'The queries of each evaluation set';
COMMENT ON TABLE pgembed.eval_judgments IS 'Rows judged for each query: relevance 0 irrelevant, above 0 relevant (graded)';
COMMENT ON COLUMN pgembed.eval_judgments.key IS 'the row''s primary key as a JSON object, as pgembed.search returns it';
COMMENT ON TABLE pgembed.eval_runs IS 'One row per evaluation run: target asked, pipeline and model that answered, metrics';
COMMENT ON COLUMN pgembed.eval_runs.target IS 'what was asked: an alias or a pipeline';
COMMENT ON COLUMN pgembed.eval_runs.metrics IS 'means over the set''s queries: ndcg@10, and recall@k, p@k, mrr@k for each k in ks';
COMMENT ON COLUMN pgembed.eval_runs.query_tokens IS 'tokens the query embeddings took (cached queries: 0); usage purpose query';

-- Model migrations and the live lane
COMMENT ON TABLE pgembed.bulk_lane IS 'When bulk work (backfill, repair, migration) may be claimed: opens..closes in time_zone, NULL always; live changes are claimed first in any case';
COMMENT ON COLUMN pgembed.bulk_lane.rate_share IS 'the share of each API key''s rate budget that bulk requests may take; live ones may take all of it';
COMMENT ON TABLE pgembed.model_migrations IS 'Model migrations of an alias: from_pipeline (the active one at start) to to_pipeline (the shadow of the new model), their phase and estimate';
COMMENT ON COLUMN pgembed.model_migrations.phase IS 'started (shadow backfilling), cut_over (the alias points at the shadow), rolled_back (back to from_pipeline), cleaned_up (the unused pipeline dropped)';
COMMENT ON COLUMN pgembed.model_migrations.estimate IS 'pgembed migrate plan''s dry run at start: rows, chunks, tokens, cached, usd, seconds';
COMMENT ON COLUMN pgembed.model_migrations.max_drop IS 'cutover refuses when a metric of the shadow is more than this many points (1 = 0.01) below the active''s';
COMMENT ON COLUMN pgembed.model_migrations.rollback_window IS 'how long after cutover rollback is possible; then the scheduled cleanup drops from_pipeline';
COMMENT ON TABLE pgembed.model_migration_events IS 'Each phase of a migration, refused and forced cutovers included, with who and the detail (metrics, reason)';

-- pgembed refresh: the end of every upgrade, after the other definitions were applied.
--
-- 1. Drops the functions and views of schema pgembed that the definitions no longer define:
--    everything this transaction did not create or replace (its pg_proc or pg_rewrite row
--    is older than this transaction: age(xmin) > age(our xid), subtransactions included,
--    since their xids come later), except the generated per-pipeline functions
--    (p<id>_capture, p<id>_read, p<id>_store), which step 2 replaces, and the binding views
--    (p<id>_content, p<id>_cost_center, see schema_changes.sql), which follow their tables. Without CASCADE: if an
--    object of the application's depends on one of them, the upgrade stops and says which.
-- 2. Regenerates every pipeline's code with the generator just installed.
DO $$
DECLARE
    me xid := pg_catalog.xid(pg_catalog.pg_current_xact_id());
    stale text;
BEGIN
    SELECT pg_catalog.string_agg(c.oid::pg_catalog.regclass::text, ', ') INTO stale
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_rewrite r ON r.ev_class = c.oid
     WHERE c.relnamespace = 'pgembed'::regnamespace AND c.relkind = 'v' AND pg_catalog.age(r.xmin) > pg_catalog.age(me)
       AND c.relname !~ '^p[0-9]+_(content|cost_center)$';
    IF stale IS NOT NULL THEN
        EXECUTE 'DROP VIEW ' || stale;
    END IF;
    SELECT pg_catalog.string_agg(p.oid::pg_catalog.regprocedure::text, ', ') INTO stale
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace = 'pgembed'::regnamespace AND pg_catalog.age(p.xmin) > pg_catalog.age(me)
       AND p.proname !~ '^p[0-9]+_(capture|read|store)$';
    IF stale IS NOT NULL THEN
        EXECUTE 'DROP FUNCTION ' || stale;
    END IF;
END
$$;

SELECT pgembed.regenerate_all_pipelines();

-- pgembed roles and privileges. Runs last in every migration and is re-runnable: whatever
-- the other files created or replaced, afterwards the grants are the ones below.
--
-- Two group roles, neither of which can log in; a DBA grants them to login roles (README,
-- "Privileges and roles"):
--   pgembed_reader  a DBA who watches: every view of schema pgembed, and nothing else (not
--                   the queue, the cache, the vectors, nor the application's tables).
--   pgembed_worker  `pgembed worker --no-scheduler`: the least it needs to claim rows, read
--                   them, embed and write. Plus SELECT on each source table, which the DBA
--                   grants (pgembed hands out no rights on the application's tables). The
--                   scheduled jobs (audit repair, clean-up, index upkeep) need the owner.
-- The owner, the role that ran `pgembed init`, owns everything and creates pipelines. The
-- application's roles get nothing: their writes reach the queue through the SECURITY
-- DEFINER triggers.
--
-- Roles belong to the whole cluster, not to one database: the same two serve every database
-- of the cluster that runs pgembed (a member of pgembed_reader reads the views of each of
-- them it may connect to). So init creates them only when they are missing (that needs
-- CREATEROLE, once per cluster), tolerates an init in another database creating them at the
-- same moment, and the downgrade never drops them: other databases may still use them.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY '{pgembed_reader,pgembed_worker}'::text[] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r);
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXECUTE format('COMMENT ON ROLE %I IS %L', r, CASE r
                WHEN 'pgembed_reader' THEN 'pgembed: reads the views of schema pgembed, nothing else'
                ELSE 'pgembed: what a pgembed worker needs (plus SELECT on each source table)' END);
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- an init in another database of the cluster created it meanwhile
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'pgembed: role % does not exist and % may not create roles', r, current_user
                    USING HINT = format('Have a role with CREATEROLE run CREATE ROLE %I NOLOGIN; once for '
                                        'the cluster, then run pgembed init again.', r);
        END;
    END LOOP;
END
$$;

-- A SECURITY DEFINER function runs with the owner's rights: nobody calls one unless granted
-- (the capture triggers fire without EXECUTE; gaps and pipeline_counts are granted below).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'pgembed'::regnamespace AND p.prosecdef LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA pgembed TO pgembed_reader, pgembed_worker;

-- The reader: every view, and the two functions consistency_gaps and pipeline_status call
-- (a view's functions run with the reader's rights; these two are SECURITY DEFINER, see
-- their comments in audit.sql for why that is safe).
DO $$
DECLARE
    v text;
BEGIN
    FOR v IN SELECT format('%I.%I', schemaname, viewname) FROM pg_catalog.pg_views
              WHERE schemaname = 'pgembed'
                AND viewname !~ '^p[0-9]+_(content|cost_center)$'  -- binding views: pgembed's own
                -- an alias's view holds its pipeline's vectors: the DBA grants it (kept across repoints)
                AND viewname NOT IN (SELECT a.name FROM pgembed.aliases a) LOOP
        EXECUTE format('GRANT SELECT ON %s TO pgembed_reader', v);
    END LOOP;
END
$$;
GRANT EXECUTE ON FUNCTION pgembed.gaps(text), pgembed.pipeline_counts(text) TO pgembed_reader;
GRANT SELECT ON pgembed.audit_runs, pgembed.audit_findings, pgembed.failure_classes TO pgembed_reader;
-- search names and evaluation: what each alias points at, the sets, every run
GRANT SELECT ON pgembed.aliases, pgembed.eval_sets, pgembed.eval_runs TO pgembed_reader;
GRANT SELECT ON pgembed.model_migrations, pgembed.model_migration_events, pgembed.bulk_lane TO pgembed_reader;

-- The worker: reads pipelines and models, leases and acknowledges queue rows, keeps the
-- embedding cache, records failures and usage, keeps its heartbeat row, spends the shared
-- rate-limit budget (pgembed.take_budget runs with the caller's rights).
GRANT SELECT ON pgembed.pipelines, pgembed.models TO pgembed_worker;
GRANT SELECT, UPDATE, DELETE ON pgembed.outbox TO pgembed_worker;
GRANT SELECT ON pgembed.outbox_statements TO pgembed_worker;
GRANT EXECUTE ON FUNCTION pgembed.expand_statements(text, bigint) TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgembed.failures TO pgembed_worker;
GRANT SELECT ON pgembed.failure_classes TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE ON pgembed.embedding_cache TO pgembed_worker;
GRANT INSERT ON pgembed.usage TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgembed.workers TO pgembed_worker;
GRANT SELECT ON pgembed.rate_limits TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE ON pgembed.rate_limit_state TO pgembed_worker;
GRANT SELECT ON pgembed.bulk_lane TO pgembed_worker;  -- claim_from reads its window
GRANT EXECUTE ON FUNCTION pgembed.take_bulk_budget(text, int, bigint) TO pgembed_worker;
-- Each pipeline's destination table and read/store functions: create_pipeline grants them
-- (pgembed.grant_pipeline_to_workers); again here for the pipelines that exist already.
-- Which HNSW indexes wait for their backfill to end (pgembed.deferred_indexes, service.sql):
-- a worker reads the plan; building one takes the destination's owner, so a pgembed_worker
-- logs that it cannot and leaves it to a worker running as the owner.
-- The schema revision, which a worker reads at start to refuse a schema it does not know
-- (alembic's version table, kept outside schema pgembed: pgembed/migrate.py).
DO $$
BEGIN
    PERFORM pgembed.grant_pipeline_to_workers(p) FROM pgembed.pipelines p;
    IF pg_catalog.to_regclass('pgembed.deferred_indexes') IS NOT NULL THEN
        GRANT SELECT ON pgembed.deferred_indexes TO pgembed_worker;
    END IF;
    IF pg_catalog.to_regclass('public.pgembed_alembic_version') IS NOT NULL THEN
        GRANT SELECT ON public.pgembed_alembic_version TO pgembed_worker;
    END IF;
END
$$;
