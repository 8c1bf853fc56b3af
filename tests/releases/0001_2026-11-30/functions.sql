-- pgembed functions. Re-runnable: every function is CREATE OR REPLACE.
--
-- Every function pins search_path to pg_catalog, pg_temp and qualifies what it calls, so a
-- lookalike schema or function earlier on a caller's path changes nothing. Identifiers from
-- users go through format('%I'); values are bound or quoted with %L.

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
        RETURN ROW(p_model, n, true, 1000000, 100000, 100000000, 0, 'h' || n)::pgembed.models;
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
    shape text;
    whole text;
    head text;
    tail text;
    again record;
BEGIN
    IF p_content IS NULL OR btrim(p_content) = '' THEN
        RAISE EXCEPTION 'pgembed: % must be a SQL expression over the columns of %',
            p_what, p_source;
    END IF;
    -- the expression is read with the creator's path; the SET clause restores ours on exit
    PERFORM pg_catalog.set_config('search_path', p_path, true);
    BEGIN
        OPEN probe FOR EXECUTE format('SELECT (%s)::text FROM %s WHERE false', p_content, p_source);
        CLOSE probe;
        EXECUTE format('CREATE TEMP VIEW %I AS SELECT (%s)::text AS pgembed_content FROM %s WHERE false',
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
    -- functions that cannot write (IMMUTABLE or STABLE: the same text for the same row is
    -- also what the cache relies on), owned by the creator or a superuser: a function another
    -- role owns could be replaced later by one that runs statements as the worker. Every
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
        RAISE EXCEPTION 'pgembed: the % expression may call only IMMUTABLE or STABLE functions owned by you or a superuser, not %',
            p_what, others
            USING HINT = 'Declare your function IMMUTABLE or STABLE and own it (ALTER FUNCTION ... OWNER TO ...).';
    END IF;
    -- (on our pinned path, regprocedure prints every function outside pg_catalog qualified)
    SELECT coalesce(array_agg(f::regprocedure::text ORDER BY f::regprocedure::text), '{}')
      INTO functions FROM unnest(fns) AS f;
    -- refobjsubid 0 is a whole-row reference: then every column counts
    SELECT coalesce(array_agg(a.attname ORDER BY a.attnum), '{}') INTO columns
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = p_source AND a.attnum > 0 AND NOT a.attisdropped
       AND EXISTS (
           SELECT 1 FROM pg_catalog.pg_depend d
             JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
            WHERE r.ev_class = probe_oid
              AND d.refobjid = p_source
              AND d.refobjsubid IN (0, a.attnum));
    IF p_bind THEN
        -- The deparsed probe is "<head><expression><tail>"; a probe of NULL::text over the
        -- same table shows what head and tail look like.
        EXECUTE format('CREATE TEMP VIEW %I AS SELECT NULL::text AS pgembed_content FROM %s WHERE false',
                       probe_view || '_shape', p_source);
        shape := pg_catalog.pg_get_viewdef(format('pg_temp.%I', probe_view || '_shape')::regclass, false);
        whole := pg_catalog.pg_get_viewdef(probe_oid, false);
        EXECUTE format('DROP VIEW pg_temp.%I', probe_view || '_shape');
        head := left(shape, strpos(shape, 'NULL::text') - 1);
        tail := substr(shape, strpos(shape, 'NULL::text') + length('NULL::text'));
        IF strpos(shape, 'NULL::text') = 0 OR left(whole, length(head)) <> head
           OR right(whole, length(tail)) <> tail OR length(whole) <= length(head) + length(tail) THEN
            RAISE EXCEPTION 'pgembed: cannot bind the names of the % expression for % (deparsed as %)',
                p_what, p_source, whole;
        END IF;
        bound := substr(whole, length(head) + 1, length(whole) - length(head) - length(tail));
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

-- Creates the per-pipeline functions and the triggers. Static SQL in each function body
-- means PostgreSQL plans it once per session, not once per statement.
CREATE OR REPLACE FUNCTION pgembed.generate_pipeline_code(p pgembed.pipelines)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $gen$
DECLARE
    dest text := format('pgembed.%I', p.destination);
    key_json_n text := 'jsonb_build_array(' || pgembed.sql_list('n.%1$I::text', p.key_columns) || ')';
    key_json_o text := 'jsonb_build_array(' || pgembed.sql_list('o.%1$I::text', p.key_columns) || ')';
    keys_n text := '(' || pgembed.sql_list('n.%1$I', p.key_columns) || ')';
    keys_o text := '(' || pgembed.sql_list('o.%1$I', p.key_columns) || ')';
    keys_d text := '(' || pgembed.sql_list('d.%1$I', p.key_columns) || ')';
    changed text;
    capture text := format('pgembed.%I', 'p' || p.id || '_capture');
    enqueue text;
BEGIN
    IF cardinality(p.content_columns) = 0 THEN
        changed := 'false';
    ELSE
        changed := format('(%s) IS DISTINCT FROM (%s)',
                          pgembed.sql_list('o.%1$I::text', p.content_columns),
                          pgembed.sql_list('n.%1$I::text', p.content_columns));
    END IF;
    enqueue := format($q$
        INSERT INTO pgembed.outbox AS q (pipeline, key)
        SELECT %1$L, %2$s FROM new_rows n /*rows*/
        ON CONFLICT (pipeline, key) DO UPDATE
           -- A row waiting in line keeps its place (LEAST): moving it to the back on every
           -- change would starve a hot row behind any backlog, and leaving the indexed
           -- available_at alone lets the bump be a HOT update. A row backing off after a
           -- failure becomes ready now; a leased row keeps its lease's expiry.
           SET version = q.version + 1, changed_at = now(), attempts = 0,
               available_at = CASE WHEN q.lease_id IS NULL THEN LEAST(q.available_at, now())
                                   ELSE q.available_at END;
        GET DIAGNOSTICS queued = ROW_COUNT;$q$, p.name, key_json_n);
    IF cardinality(p.key_columns) = 1 THEN
        -- a statement of many rows leaves one batch row; a worker expands it
        enqueue := format($q$
        INSERT INTO pgembed.outbox_batches (pipeline, keys, key_count)
        SELECT %1$L, array_agg(n.%2$I::text), count(*) FROM new_rows n /*rows*/
        HAVING count(*) >= %3$s;
        IF FOUND THEN
            queued := 1;
        ELSE%4$s
        END IF;$q$, p.name, p.key_columns[1], pgembed.batch_capture_rows(), enqueue);
    END IF;

    EXECUTE format($f$
CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
-- generated by pgembed for pipeline %2$L; do not edit
DECLARE
    queued bigint := 0;
BEGIN
    IF TG_OP = 'INSERT' THEN
        %3$s
    ELSIF TG_OP = 'UPDATE' THEN
        -- a key that vanished (primary key changed) is a delete: its vectors go now
        DELETE FROM pgembed.outbox q USING old_rows o
         WHERE q.pipeline = %2$L AND q.key = %4$s
           AND NOT EXISTS (SELECT 1 FROM new_rows n WHERE %5$s = %6$s);
        DELETE FROM pgembed.failures q USING old_rows o
         WHERE q.pipeline = %2$L AND q.key = %4$s
           AND NOT EXISTS (SELECT 1 FROM new_rows n WHERE %5$s = %6$s);
        DELETE FROM %7$s d USING old_rows o
         WHERE %8$s = %6$s AND NOT EXISTS (SELECT 1 FROM new_rows n WHERE %5$s = %6$s);
        %9$s
    ELSIF TG_OP = 'DELETE' THEN
        -- outbox first: waits for a worker writing these keys, then its vectors go too
        DELETE FROM pgembed.outbox q USING old_rows o WHERE q.pipeline = %2$L AND q.key = %4$s;
        DELETE FROM pgembed.failures q USING old_rows o WHERE q.pipeline = %2$L AND q.key = %4$s;
        DELETE FROM %7$s d USING old_rows o WHERE %8$s = %6$s;
    ELSIF TG_OP = 'TRUNCATE' THEN
        DELETE FROM pgembed.outbox_batches WHERE pipeline = %2$L;
        DELETE FROM pgembed.outbox WHERE pipeline = %2$L;
        DELETE FROM pgembed.failures WHERE pipeline = %2$L;
        TRUNCATE %7$s;
    END IF;
    IF queued > 0 THEN
        PERFORM pg_catalog.pg_notify('pgembed', %2$L);
    END IF;
    RETURN NULL;
END
$body$;
REVOKE ALL ON FUNCTION %1$s() FROM PUBLIC;$f$,
        capture, p.name,
        replace(enqueue, '/*rows*/', ''),
        key_json_o, keys_n, keys_o, dest, keys_d,
        replace(enqueue, '/*rows*/', format(
            'LEFT JOIN old_rows o ON %s = %s WHERE o.%I IS NULL OR %s',
            keys_o, keys_n, p.key_columns[1], changed)));

    EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %s()', 'pgembed_' || p.id || '_insert',
                   p.source, capture);
    EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows '
                   'NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   'pgembed_' || p.id || '_update', p.source, capture);
    EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %s()', 'pgembed_' || p.id || '_delete',
                   p.source, capture);
    EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   'pgembed_' || p.id || '_truncate', p.source, capture);

    -- The reader runs with the worker's rights (SECURITY INVOKER) and evaluates the bound
    -- forms of `content` and `cost_center` on search_path pg_catalog: they mean what they
    -- meant when the pipeline was created, whatever is created later in a schema of the
    -- creator's path, and the worker hashes exactly the text the audit's stale check hashes.
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION pgembed.%1$I(keys jsonb)
RETURNS TABLE (key jsonb, found boolean, content text, cost_center text)
LANGUAGE sql STABLE
SET search_path = %2$s
AS $body$
    -- generated by pgembed for pipeline %3$L; do not edit
    SELECT pgembed_keys.key, pgembed_row.found IS NOT NULL,
           pgembed_row.content, pgembed_row.cost_center
    FROM pg_catalog.jsonb_array_elements(keys) AS pgembed_keys(key)
    LEFT JOIN LATERAL (
        SELECT true AS found, (%4$s)::text AS content, (%5$s)::text AS cost_center
        FROM %6$s
        WHERE (%7$s) = (%8$s)
    ) AS pgembed_row ON true
$body$;
REVOKE ALL ON FUNCTION pgembed.%1$I(jsonb) FROM PUBLIC;$f$,
        'p' || p.id || '_read', 'pg_catalog, pg_temp', p.name, p.content_bound,
        coalesce(p.cost_center_bound, 'NULL'), p.source,
        pgembed.sql_list('%1$I', p.key_columns),
        pgembed.key_casts(p, 'pgembed_keys.key'));

    -- The store replaces all chunks of the given keys in one statement pair. The delete finds
    -- them through `key column = ANY (array)`, an index scan whatever the statistics say: as
    -- a join with unnest() the planner, misjudging the expression's selectivity, chose to
    -- hash the whole destination on every batch once it held some 50,000 rows.
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION pgembed.%1$I(keys jsonb[], chunk_seqs int[], chunks text[],
                                         content_hashes bytea[], chunk_hashes bytea[],
                                         embeddings %4$s.vector[])
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $body$
    -- generated by pgembed for pipeline %2$L; do not edit
    DELETE FROM %3$s d
     WHERE %6$s;
    INSERT INTO %3$s (%5$s, chunk_seq, chunk, content_hash, chunk_hash, embedding)
    SELECT %7$s, r.seq, r.chunk, r.content_hash, r.chunk_hash, r.embedding
      FROM unnest(keys, chunk_seqs, chunks, content_hashes, chunk_hashes, embeddings)
           AS r(key, seq, chunk, content_hash, chunk_hash, embedding)
     WHERE r.seq IS NOT NULL;
$body$;
REVOKE ALL ON FUNCTION pgembed.%1$I(jsonb[], int[], text[], bytea[], bytea[], %4$s.vector[]) FROM PUBLIC;$f$,
        'p' || p.id || '_store', p.name, dest, pgembed.vector_schema(),
        pgembed.sql_list('%1$I', p.key_columns),
        (SELECT string_agg(format('d.%I = ANY (ARRAY(SELECT DISTINCT (k->>%s)::%s FROM unnest(keys) AS k))',
                                  c, i - 1, t), ' AND ' ORDER BY i)
           FROM unnest(p.key_columns, p.key_types) WITH ORDINALITY AS u(c, t, i))
        -- a composite key: the columns' values pair up as they do in the keys
        || CASE WHEN cardinality(p.key_columns) > 1 THEN format(
               ' AND (%s) IN (SELECT %s FROM unnest(keys) AS k)',
               pgembed.sql_list('d.%1$I', p.key_columns), pgembed.key_casts(p, 'k')) ELSE '' END,
        pgembed.key_casts(p, 'r.key'));
    PERFORM pgembed.grant_pipeline_to_workers(p);
END
$gen$;

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
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgembed_worker') THEN
        RETURN;
    END IF;
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON pgembed.%I TO pgembed_worker', p.destination);
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgembed.%I(jsonb) TO pgembed_worker', 'p' || p.id || '_read');
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgembed.%I(jsonb[], int[], text[], bytea[], bytea[], %s.vector[]) '
                   'TO pgembed_worker', 'p' || p.id || '_store', pgembed.vector_schema());
END
$$;

-- Queues every row of a pipeline's source table (backfill, repair).
CREATE OR REPLACE FUNCTION pgembed.queue_all(p_pipeline text, p_purpose text DEFAULT 'backfill')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    n bigint;
BEGIN
    SELECT * INTO STRICT p FROM pgembed.pipelines WHERE name = p_pipeline;
    EXECUTE format($q$
        INSERT INTO pgembed.outbox AS q (pipeline, key, purpose)
        SELECT %L, jsonb_build_array(%s), %L FROM %s n
        ON CONFLICT (pipeline, key) DO UPDATE
           SET version = q.version + 1, changed_at = now(), attempts = 0$q$,
        p.name, pgembed.sql_list('n.%1$I::text', p.key_columns), p_purpose, p.source);
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pg_catalog.pg_notify('pgembed', p.name);
    RETURN n;
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
    chunk_tokens    int DEFAULT 0,
    chunk_overlap   int DEFAULT 0,
    backfill        boolean DEFAULT true,
    cost_center     text DEFAULT NULL,
    name            text DEFAULT NULL
)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.models := pgembed.model_info(model);
    dims int := coalesce(dimensions, m.dimensions);
    pk record;
    p pgembed.pipelines;
    reserved name[] := '{chunk_seq,chunk,content_hash,chunk_hash,embedding,embedded_at}';
    clash name;
    queued bigint := 0;
BEGIN
    IF (SELECT relkind FROM pg_catalog.pg_class WHERE oid = source) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'pgembed: % is not a table', source;
    END IF;
    IF dims < 1 OR dims > m.dimensions OR (dims <> m.dimensions AND NOT m.shortenable) THEN
        RAISE EXCEPTION 'pgembed: model % gives % dimensions%; % is not possible', m.model,
            m.dimensions, CASE WHEN m.shortenable THEN ' or fewer' ELSE ' exactly' END, dims;
    END IF;
    IF index NOT IN ('hnsw', 'ivfflat', 'none') THEN
        RAISE EXCEPTION 'pgembed: index must be hnsw, ivfflat or none, not %', index;
    END IF;
    IF distance NOT IN ('cosine', 'l2', 'ip') THEN
        RAISE EXCEPTION 'pgembed: distance must be cosine, l2 or ip, not %', distance;
    END IF;
    IF index <> 'none' AND dims > 2000 THEN
        RAISE EXCEPTION 'pgembed: % indexes hold vectors of at most 2000 dimensions, not %',
            index, dims USING HINT = 'Pass dimensions => 2000 or fewer, or index => ''none''.';
    END IF;
    IF chunk_tokens < 0 OR chunk_overlap < 0 OR (chunk_tokens > 0 AND chunk_overlap >= chunk_tokens)
       OR (chunk_tokens = 0 AND chunk_overlap > 0) THEN
        RAISE EXCEPTION 'pgembed: chunk_tokens must be 0 (no chunking) or more than chunk_overlap (got %, %)',
            chunk_tokens, chunk_overlap;
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
    IF EXISTS (SELECT 1 FROM pgembed.pipelines q WHERE q.name = p.name) THEN
        RAISE EXCEPTION 'pgembed: a pipeline named "%" exists already', p.name;
    END IF;
    p.source := source;
    p.content := content;
    p.search_path := search_path;
    SELECT e.columns, e.bound, e.functions
      INTO p.content_columns, p.content_bound, p.content_functions
      FROM pgembed.probe_expression(source, content, search_path, p_bind => true) AS e;
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
    p.chunk_tokens := chunk_tokens;
    p.chunk_overlap := chunk_overlap;
    p.index_type := index;
    p.index_options := coalesce(index_options, '{}');
    p.distance := distance;

    INSERT INTO pgembed.pipelines (name, source, content, content_columns, content_bound,
        content_functions, cost_center, cost_center_bound, model,
        dimensions, destination, key_columns, key_types, chunk_tokens, chunk_overlap,
        index_type, index_options, distance, search_path)
    VALUES (p.name, p.source, p.content, p.content_columns, p.content_bound,
        p.content_functions, p.cost_center, p.cost_center_bound, p.model,
        p.dimensions, p.destination, p.key_columns, p.key_types, p.chunk_tokens,
        p.chunk_overlap, p.index_type, p.index_options, p.distance, p.search_path)
    RETURNING * INTO p;

    EXECUTE format('CREATE TABLE pgembed.%I (%s, chunk_seq int NOT NULL, chunk text NOT NULL, '
                   'content_hash bytea NOT NULL, chunk_hash bytea NOT NULL, '
                   'embedding %s.vector(%s) NOT NULL, embedded_at timestamptz NOT NULL DEFAULT now(), '
                   'PRIMARY KEY (%s, chunk_seq))',
                   p.destination,
                   (SELECT string_agg(format('%I %s NOT NULL', c, t), ', ' ORDER BY i)
                      FROM unnest(pk.columns, pk.types) WITH ORDINALITY AS u(c, t, i)),
                   pgembed.vector_schema(), dims, pgembed.sql_list('%1$I', pk.columns));
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
    IF p.index_type = 'hnsw' AND queued >= pgembed.defer_index_rows() THEN
        PERFORM pgembed.vector_index_sql(p);  -- bad index options are refused now, not later
        INSERT INTO pgembed.deferred_indexes (pipeline, rows_queued) VALUES (p.name, queued);
        RAISE NOTICE 'pgembed: the HNSW index of pgembed.% is built once its % rows are embedded',
            p.destination, queued;
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
    chunk_tokens    int DEFAULT 0,
    chunk_overlap   int DEFAULT 0,
    backfill        boolean DEFAULT true,
    cost_center     text DEFAULT NULL,
    name            text DEFAULT NULL
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
        chunk_tokens, chunk_overlap, backfill, cost_center, name)
$$;

-- The vector index of a destination table.
-- The CREATE INDEX statement of a pipeline's vector index (NULL for index 'none').
-- CONCURRENTLY for a build while the application writes: its deletes remove vectors.
CREATE OR REPLACE FUNCTION pgembed.vector_index_sql(p pgembed.pipelines, p_concurrently boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ops text := CASE p.distance WHEN 'cosine' THEN 'vector_cosine_ops'
                                WHEN 'l2' THEN 'vector_l2_ops' ELSE 'vector_ip_ops' END;
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
    RETURN format('CREATE INDEX %sON pgembed.%I USING %s (embedding %s.%s)%s',
                  CASE WHEN p_concurrently THEN 'CONCURRENTLY ' ELSE '' END,
                  p.destination, p.index_type, pgembed.vector_schema(), ops,
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

CREATE OR REPLACE FUNCTION pgembed.drop_pipeline(name text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    ev text;
BEGIN
    SELECT * INTO p FROM pgembed.pipelines q WHERE q.name = drop_pipeline.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgembed: no pipeline named "%"', name
            USING HINT = 'pgembed pipeline list shows the pipelines.';
    END IF;
    -- The queue first: this waits for a worker acknowledging rows of this pipeline (it
    -- holds their row locks and is about to write the destination) and makes any later
    -- acknowledgement skip them. Dropping the destination first would take its lock while
    -- that worker needs it: a deadlock.
    DELETE FROM pgembed.outbox q WHERE q.pipeline = p.name;
    DELETE FROM pgembed.outbox_batches q WHERE q.pipeline = p.name;
    DELETE FROM pgembed.failures q WHERE q.pipeline = p.name;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = p.source) THEN
        FOREACH ev IN ARRAY '{insert,update,delete,truncate}'::text[] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'pgembed_' || p.id || '_' || ev, p.source);
        END LOOP;
    END IF;
    EXECUTE format('DROP FUNCTION IF EXISTS pgembed.%I()', 'p' || p.id || '_capture');
    EXECUTE format('DROP FUNCTION IF EXISTS pgembed.%I(jsonb)', 'p' || p.id || '_read');
    EXECUTE format('DROP FUNCTION IF EXISTS pgembed.%I(jsonb[], int[], text[], bytea[], bytea[], %s.vector[])',
                   'p' || p.id || '_store', pgembed.vector_schema());
    EXECUTE format('DROP TABLE IF EXISTS pgembed.%I', p.destination);
    DELETE FROM pgembed.pipelines q WHERE q.name = p.name;  -- failures cascade
END
$$;

-- A statement that queues at least this many rows of a table with a one-column key leaves
-- one row in pgembed.outbox_batches instead of one outbox row per source row. Below it the
-- per-row outbox insert is as cheap and a worker sees the rows at once. Read when a
-- pipeline's triggers are generated.
CREATE OR REPLACE FUNCTION pgembed.batch_capture_rows()
RETURNS bigint
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 1000::bigint $$;

-- Moves the keys of a pipeline's pending batches into the outbox, until about p_keys keys
-- have moved, and returns how many did. claim() calls it before it looks for ready rows. A
-- big batch goes in slices (`expanded` counts what has moved), so no claim holds a
-- transaction open for a million-row statement. A batch another worker is expanding is
-- skipped (SKIP LOCKED). A key that is queued already is bumped, as the trigger would have
-- done. The insert waits for an application transaction queueing one of the same keys;
-- past a short lock_timeout the batch is left for a later claim, so such a transaction and
-- this one never deadlock. Other workers that claimed meanwhile found nothing: a
-- notification wakes them.
-- SECURITY DEFINER (EXECUTE for pgembed_worker, see privileges.sql): it only moves keys the
-- triggers wrote, so a worker needs no INSERT on the outbox, which would let it queue rows.
CREATE OR REPLACE FUNCTION pgembed.expand_batches(p_pipeline text, p_keys bigint DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    b record;
    n int;
    moved bigint := 0;
    timeout text := current_setting('lock_timeout');
BEGIN
    WHILE moved < p_keys LOOP
        SELECT x.id, x.keys[x.expanded + 1 : x.expanded + (p_keys - moved)::int] AS part,
               x.expanded, x.key_count, x.queued_at
          INTO b
          FROM pgembed.outbox_batches x
         WHERE x.pipeline = p_pipeline
         ORDER BY x.id LIMIT 1
           FOR UPDATE SKIP LOCKED;
        EXIT WHEN NOT FOUND;
        n := coalesce(cardinality(b.part), 0);
        BEGIN
            PERFORM set_config('lock_timeout', '100ms', true);
            INSERT INTO pgembed.outbox AS q (pipeline, key, queued_at, changed_at)
            SELECT p_pipeline, jsonb_build_array(k), b.queued_at, b.queued_at
              FROM unnest(b.part) AS k
            ON CONFLICT (pipeline, key) DO UPDATE
               SET version = q.version + 1, changed_at = excluded.changed_at, attempts = 0,
                   available_at = CASE WHEN q.lease_id IS NULL THEN LEAST(q.available_at, now())
                                       ELSE q.available_at END;
            IF n = 0 OR b.expanded + n >= b.key_count THEN
                DELETE FROM pgembed.outbox_batches x WHERE x.id = b.id;
            ELSE
                UPDATE pgembed.outbox_batches x SET expanded = x.expanded + n WHERE x.id = b.id;
            END IF;
            PERFORM set_config('lock_timeout', timeout, true);
        EXCEPTION WHEN lock_not_available THEN
            EXIT;  -- the subtransaction's rollback restored lock_timeout
        END;
        moved := moved + n;
    END LOOP;
    IF moved > 0 THEN
        PERFORM pg_notify('pgembed', p_pipeline);
    END IF;
    RETURN moved;
END
$$;

REVOKE ALL ON FUNCTION pgembed.expand_batches(text, bigint) FROM PUBLIC;

-- Keys of pending batches (one pipeline, or all): queued, though not yet in the outbox.
CREATE OR REPLACE FUNCTION pgembed.batched_keys(p_pipeline text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(sum(b.key_count - b.expanded), 0)::bigint FROM pgembed.outbox_batches b
     WHERE p_pipeline IS NULL OR b.pipeline = p_pipeline
$$;

-- The keys of a batch as the worker sends them, one jsonb array of keys (one document to
-- encode instead of one per key), as the jsonb[] that `key = ANY(...)` takes.
CREATE OR REPLACE FUNCTION pgembed.key_array(p_keys jsonb)
RETURNS jsonb[]
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$ SELECT ARRAY(SELECT jsonb_array_elements(p_keys)) $$;

-- Claims up to p_limit ready rows of one pipeline for a worker, round robin over pipelines
-- starting after p_after so that no pipeline starves. SKIP LOCKED: workers never wait on
-- each other or on an application transaction that is touching a queued row.
CREATE OR REPLACE FUNCTION pgembed.claim(p_worker text, p_lease uuid, p_limit int,
                                         p_lease_seconds double precision, p_after text DEFAULT '')
RETURNS TABLE (pipeline text, key jsonb, version bigint, purpose text, attempts int)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pl text;
BEGIN
    FOR pl IN
        SELECT q.name FROM pgembed.pipelines q
         ORDER BY q.name <= coalesce(p_after, ''), q.name
    LOOP
        PERFORM pgembed.expand_batches(pl);
        RETURN QUERY
        WITH ready AS (
            -- oldest first within the pipeline; rows leased or backing off are not ready
            SELECT o.pipeline, o.key FROM pgembed.outbox o
             WHERE o.pipeline = pl AND o.available_at <= now()
             ORDER BY o.available_at
             LIMIT p_limit
             FOR UPDATE SKIP LOCKED
        )
        UPDATE pgembed.outbox o
           SET lease_id = p_lease, leased_by = p_worker,
               available_at = now() + make_interval(secs => p_lease_seconds)
          FROM ready
         WHERE o.pipeline = ready.pipeline AND o.key = ready.key
        RETURNING o.pipeline, o.key, o.version, o.purpose, o.attempts;
        IF FOUND THEN
            RETURN;
        END IF;
    END LOOP;
END
$$;

-- Puts parked failures back in the queue (all pipelines, or one).
CREATE OR REPLACE FUNCTION pgembed.retry_failures(p_pipeline text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    WITH parked AS (
        UPDATE pgembed.failures f SET parked_at = NULL, attempts = 0
         WHERE f.parked_at IS NOT NULL AND (p_pipeline IS NULL OR f.pipeline = p_pipeline)
        RETURNING f.pipeline, f.key
    )
    INSERT INTO pgembed.outbox AS q (pipeline, key, purpose)
    SELECT pipeline, key, 'retry' FROM parked
    ON CONFLICT (pipeline, key) DO UPDATE SET available_at = now(), attempts = 0;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_catalog.pg_notify('pgembed', coalesce(p_pipeline, ''));
    END IF;
    RETURN n;
END
$$;

-- Records rows that could not be embedded. Each failure counts an attempt; the row goes back
-- to the queue after an exponential backoff, or is parked (leaves the queue) once it has
-- failed p_max_attempts times. Only rows still held under p_lease are touched.
CREATE OR REPLACE FUNCTION pgembed.record_failures(p_pipeline text, p_lease uuid, p_keys jsonb[],
                                                   p_errors text[], p_max_attempts int,
                                                   p_retry_base double precision)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH failed AS (
        SELECT o.key, o.attempts + 1 AS attempts, e.error
          FROM unnest(p_keys, p_errors) AS e(key, error)
          JOIN pgembed.outbox o ON o.pipeline = p_pipeline AND o.key = e.key
         WHERE o.lease_id = p_lease
    ),
    logged AS (
        INSERT INTO pgembed.failures AS f (pipeline, key, error, attempts, parked_at)
        SELECT p_pipeline, key, error, attempts,
               CASE WHEN attempts >= p_max_attempts THEN now() END
          FROM failed
        ON CONFLICT (pipeline, key) DO UPDATE
           SET error = excluded.error, attempts = excluded.attempts,
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
