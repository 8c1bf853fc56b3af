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
    PERFORM pgembed.generate_search_function(p);
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
