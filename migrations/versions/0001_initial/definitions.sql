-- Revision 0001's definitions (functions, views, grants) as first shipped, without its
-- tables: what the downgrade of 0002 re-applies. Made from the files beside this one
-- (service.sql less its CREATE TABLE and CREATE INDEX statements; the other files'
-- tables are CREATE ... IF NOT EXISTS and stay). Frozen like them.

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

    -- The reader runs with the worker's rights (SECURITY INVOKER) and the creator's
    -- search_path, so `content` means what it meant when the pipeline was created.
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
        'p' || p.id || '_read', p.search_path, p.name, p.content,
        coalesce(p.cost_center, 'NULL'), p.source,
        pgembed.sql_list('%1$I', p.key_columns),
        pgembed.key_casts(p, 'pgembed_keys.key'));

    -- The store replaces all chunks of the given keys in one statement pair.
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
     USING (SELECT DISTINCT k FROM unnest(keys) AS k) AS o
     WHERE (%8$s) = (%6$s);
    INSERT INTO %3$s (%5$s, chunk_seq, chunk, content_hash, chunk_hash, embedding)
    SELECT %7$s, r.seq, r.chunk, r.content_hash, r.chunk_hash, r.embedding
      FROM unnest(keys, chunk_seqs, chunks, content_hashes, chunk_hashes, embeddings)
           AS r(key, seq, chunk, content_hash, chunk_hash, embedding)
     WHERE r.seq IS NOT NULL;
$body$;
REVOKE ALL ON FUNCTION pgembed.%1$I(jsonb[], int[], text[], bytea[], bytea[], %4$s.vector[]) FROM PUBLIC;$f$,
        'p' || p.id || '_store', p.name, dest, pgembed.vector_schema(),
        pgembed.sql_list('%1$I', p.key_columns),
        pgembed.key_casts(p, 'o.k'),
        pgembed.key_casts(p, 'r.key'),
        pgembed.sql_list('d.%1$I', p.key_columns));
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
        PERFORM pgembed.probe_expression(source, cost_center, search_path, 'cost_center');
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
        content_functions, cost_center, model,
        dimensions, destination, key_columns, key_types, chunk_tokens, chunk_overlap,
        index_type, index_options, distance, search_path)
    VALUES (p.name, p.source, p.content, p.content_columns, p.content_bound,
        p.content_functions, p.cost_center, p.model,
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
    DELETE FROM pgembed.pipelines q WHERE q.name = p.name;  -- outbox and failures cascade
END
$$;

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
-- Re-runnable: the table is CREATE ... IF NOT EXISTS, functions and views CREATE OR REPLACE.

-- One row per audit run (pgembed audit, the scheduler's periodic job), so the trend of each
-- gap kind is visible over time. Counts are what the run found, before any repair.
CREATE TABLE IF NOT EXISTS pgembed.audit_runs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at       timestamptz,                 -- NULL only while the run is in progress
    pipeline          text,                        -- NULL: every pipeline; no FK, history outlives a drop
    missing           bigint NOT NULL DEFAULT 0,
    orphaned          bigint NOT NULL DEFAULT 0,
    stale             bigint NOT NULL DEFAULT 0,
    failed            bigint NOT NULL DEFAULT 0,
    oldest_gap_since  timestamptz,                 -- min(since) over the gaps found
    oldest_gap        interval,                    -- started_at - oldest_gap_since
    repaired          boolean NOT NULL DEFAULT false,
    requeued          bigint NOT NULL DEFAULT 0,   -- missing + stale keys put in the outbox
    orphans_deleted   bigint NOT NULL DEFAULT 0,   -- orphaned keys whose vectors were deleted
    CHECK (repaired OR (requeued = 0 AND orphans_deleted = 0))
);

CREATE INDEX IF NOT EXISTS audit_runs_started ON pgembed.audit_runs (started_at);

-- The source table of a pipeline as a schema-qualified, quoted name, or NULL when it was
-- dropped behind pgembed's back. Qualified explicitly: the gap queries run on the pipeline's
-- own search_path, where an unqualified name could mean another table.
CREATE OR REPLACE FUNCTION pgembed.source_name(p pgembed.pipelines)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p.source
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
    -- the same key text the triggers write: jsonb_build_array(col::text, ...)
    key_s text := 'pg_catalog.jsonb_build_array('
                  || pgembed.sql_list('s.%1$I::pg_catalog.text', p.key_columns) || ')';
    key_d text := 'pg_catalog.jsonb_build_array('
                  || pgembed.sql_list('d.%1$I::pg_catalog.text', p.key_columns) || ')';
    same_key text := pgembed.sql_list('d.%1$I = s.%1$I', p.key_columns, ' AND ');
    not_queued text := 'NOT EXISTS (SELECT 1 FROM pgembed.outbox o '
                       'WHERE o.pipeline = %1$L AND o.key = %2$s)';
    not_failed text := 'NOT EXISTS (SELECT 1 FROM pgembed.failures f '
                       'WHERE f.pipeline = %1$L AND f.key = %2$s)';
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
            format(not_queued, p.name, key_s), format(not_failed, p.name, key_s));
    WHEN 'orphaned' THEN
        RETURN format($q$
SELECT %1$s AS key, d.embedded_at AS since
  FROM %2$s d
 WHERE d.chunk_seq = 0
   AND NOT EXISTS (SELECT 1 FROM %3$s s WHERE %4$s)
   AND %5$s$q$,
            key_d, dest, src, same_key, format(not_queued, p.name, key_d));
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
            format(not_queued, p.name, key_s), format(not_failed, p.name, key_s));
    ELSE
        RAISE EXCEPTION 'pgembed: gap kind must be missing, orphaned or stale, not %', p_kind;
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
SET row_security = off
AS $$
#variable_conflict use_column
DECLARE
    p pgembed.pipelines;
    untrusted text;
    stale_keys jsonb[];
    stale_since timestamptz[];
BEGIN
    FOR p IN SELECT * FROM pgembed.pipelines_named(p_pipeline) LOOP
        RETURN QUERY
            SELECT p.name, f.key, 'failed'::text, f.first_failed_at
              FROM pgembed.failures f
             WHERE f.pipeline = p.name AND f.parked_at IS NOT NULL;
        IF pgembed.source_name(p) IS NULL THEN
            RAISE WARNING 'pgembed: pipeline "%": its source table was dropped; drop the pipeline', p.name;
            CONTINUE;
        END IF;

        RETURN QUERY EXECUTE format('SELECT %L::pg_catalog.text, g.key, %L::pg_catalog.text, g.since FROM (%s) g',
                                    p.name, 'missing', pgembed.gap_sql(p, 'missing'));
        RETURN QUERY EXECUTE format('SELECT %L::pg_catalog.text, g.key, %L::pg_catalog.text, g.since FROM (%s) g',
                                    p.name, 'orphaned', pgembed.gap_sql(p, 'orphaned'));
        -- collected first, so that a failing expression leaves no half-returned rows
        stale_keys := NULL;
        stale_since := NULL;
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
        END IF;
        RETURN QUERY
            SELECT p.name, u.key, 'stale'::text, u.since
              FROM unnest(stale_keys, stale_since) AS u(key, since);
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
BEGIN
    SELECT * INTO p FROM pgembed.pipelines_named(coalesce(p_pipeline, ''));
    -- a dropped source table counts as NULL rows; gaps() warns about it
    EXECUTE format('SELECT %s, count(*) FILTER (WHERE d.chunk_seq = 0), max(d.embedded_at) '
                   'FROM pgembed.%I d',
                   coalesce('(SELECT count(*) FROM ' || pgembed.source_name(p) || ')', 'NULL'),
                   p.destination)
       INTO source_rows, embedded_rows, last_embedded_at;
END
$$;

REVOKE ALL ON FUNCTION pgembed.pipeline_counts(text) FROM PUBLIC;

-- One row per gap, all pipelines. For one pipeline, SELECT * FROM pgembed.gaps('name')
-- computes only that one.
CREATE OR REPLACE VIEW pgembed.consistency_gaps AS
SELECT g.pipeline, g.key, g.kind, g.since
  FROM pgembed.gaps() AS g;

-- The health of each pipeline at a glance. The outbox splits three ways:
--   queued     ready to be claimed (including leases that expired: a worker died)
--   in_flight  held under a live lease
--   retrying   waiting out the backoff after a failed attempt
-- oldest_gap: how long the oldest unresolved thing (gap or queued row) has waited.
-- Reads every source and destination table in full: seconds on a million rows.
CREATE OR REPLACE VIEW pgembed.pipeline_status AS
SELECT p.name AS pipeline,
       p.model,
       c.source_rows,
       c.embedded_rows,
       q.queued,
       q.in_flight,
       q.retrying,
       g.failed,
       g.missing,
       g.orphaned,
       g.stale,
       now() - LEAST(g.oldest, q.oldest) AS oldest_gap,
       c.last_embedded_at
  FROM pgembed.pipelines p
 CROSS JOIN LATERAL pgembed.pipeline_counts(p.name) AS c
 CROSS JOIN LATERAL (
       SELECT count(*) FILTER (WHERE o.available_at <= now()) AS queued,
              count(*) FILTER (WHERE o.lease_id IS NOT NULL AND o.available_at > now()) AS in_flight,
              count(*) FILTER (WHERE o.lease_id IS NULL AND o.available_at > now()) AS retrying,
              min(o.queued_at) AS oldest
         FROM pgembed.outbox o
        WHERE o.pipeline = p.name) AS q
 CROSS JOIN LATERAL (
       SELECT count(*) FILTER (WHERE x.kind = 'missing') AS missing,
              count(*) FILTER (WHERE x.kind = 'orphaned') AS orphaned,
              count(*) FILTER (WHERE x.kind = 'stale') AS stale,
              count(*) FILTER (WHERE x.kind = 'failed') AS failed,
              min(x.since) AS oldest
         FROM pgembed.gaps(p.name) AS x) AS g;

-- Deletes the vectors of orphaned keys, re-checking at delete time that the source row is
-- still gone and the key still not queued (a row re-inserted meanwhile keeps its vectors).
-- Returns how many keys lost their vectors.
CREATE OR REPLACE FUNCTION pgembed.delete_orphans(p pgembed.pipelines, p_keys jsonb[])
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM pg_catalog.set_config('search_path', p.search_path, true);
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
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
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
        WITH g AS MATERIALIZED (
            SELECT x.key, x.kind, x.since FROM pgembed.gaps(p.name) AS x
        ),
        queued AS (
            INSERT INTO pgembed.outbox AS q (pipeline, key, purpose)
            SELECT p.name, g.key, 'repair' FROM g
             WHERE run.repaired AND g.kind IN ('missing', 'stale')
            ON CONFLICT (pipeline, key) DO UPDATE
               SET version = q.version + 1, changed_at = now(), attempts = 0,
                   available_at = CASE WHEN q.lease_id IS NULL THEN now() ELSE q.available_at END
            RETURNING 1
        )
        SELECT count(*) FILTER (WHERE g.kind = 'missing') AS missing,
               count(*) FILTER (WHERE g.kind = 'orphaned') AS orphaned,
               count(*) FILTER (WHERE g.kind = 'stale') AS stale,
               count(*) FILTER (WHERE g.kind = 'failed') AS failed,
               min(g.since) AS oldest,
               (SELECT count(*) FROM queued) AS requeued,
               array_agg(g.key) FILTER (WHERE g.kind = 'orphaned') AS orphans
          INTO found_
          FROM g;

        run.missing := run.missing + found_.missing;
        run.orphaned := run.orphaned + found_.orphaned;
        run.stale := run.stale + found_.stale;
        run.failed := run.failed + found_.failed;
        run.oldest_gap_since := LEAST(run.oldest_gap_since, found_.oldest);
        run.requeued := run.requeued + found_.requeued;
        IF run.repaired AND found_.orphans IS NOT NULL THEN
            run.orphans_deleted := run.orphans_deleted + pgembed.delete_orphans(p, found_.orphans);
        END IF;
    END LOOP;

    IF run.requeued > 0 THEN
        PERFORM pg_catalog.pg_notify('pgembed', coalesce(p_pipeline, ''));
    END IF;
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

-- pgembed worker fleet: heartbeats, scheduled jobs, IVFFlat upkeep.
--
-- Workers register here (pgembed.workers) so a DBA sees the fleet in plain SQL next to
-- pg_stat_activity (application_name 'pgembed-worker'). Periodic jobs (audit, clean-up,
-- retry of parked failures, index upkeep) run inside the workers; PostgreSQL makes sure
-- each runs once per period however many workers there are: an advisory lock keeps two
-- runs from overlapping, and a unique (job, period_start) keeps a period from running twice.

-- One row per running worker, upserted by its heartbeat and deleted when it exits cleanly.
-- A row whose last_seen is old belongs to a worker that died; its leases expire by
-- themselves and the clean-up job removes the row after a day.

-- What each worker plans to run and when (seen by `pgembed status`). Workers upsert the row
-- at start and after each run; periods are aligned on the epoch, so all workers agree.

-- One row per run of a scheduled job, whoever ran it. finished_at NULL with an old
-- started_at means the run was interrupted (its worker died or was stopped mid-run).


-- The IVFFlat index a worker trained for a pipeline: how many rows it saw and how many
-- lists it made, so upkeep can tell when the data outgrew it.

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

-- A worker that exits cleanly leaves no row behind.
CREATE OR REPLACE FUNCTION pgembed.worker_exit(p_name text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ DELETE FROM pgembed.workers WHERE name = p_name; $$;

-- Queue depth for metrics and status lines: ready to claim, leased by a worker, backing off.
CREATE OR REPLACE FUNCTION pgembed.queue_depth(OUT ready bigint, OUT leased bigint, OUT waiting bigint)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*) FILTER (WHERE available_at <= now()),
           count(*) FILTER (WHERE available_at > now() AND lease_id IS NOT NULL),
           count(*) FILTER (WHERE available_at > now() AND lease_id IS NULL)
      FROM pgembed.outbox;
$$;

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

-- The audit job: runs pgembed.audit() when it is installed and callable without
-- arguments (its parameters have defaults), with p_repair => true when asked to repair,
-- and returns what it returned (as JSON) for job_runs.detail.
CREATE OR REPLACE FUNCTION pgembed.run_scheduled_audit(p_repair boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc
                    WHERE pronamespace = 'pgembed'::regnamespace AND proname = 'audit'
                      AND pronargs = pronargdefaults) THEN
        RETURN 'pgembed.audit() is not installed; nothing to do';
    END IF;
    -- works whether audit() returns a scalar, a row or a set of rows
    EXECUTE format('SELECT string_agg(to_jsonb(r)::text, E''\n'') FROM pgembed.audit(%s) AS r',
                   CASE WHEN p_repair THEN 'p_repair => true' ELSE '' END)
       INTO result;
    RETURN coalesce(result, 'done');
END
$$;

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

-- Re-queues parked failures on a slow, doubling backoff: a row parked at P that first failed
-- at F is retried at P + clamp(P - F, p_min_wait, p_max_wait). So it waits p_min_wait after
-- its first parking, then about as long again as it has been failing: 1h, 1h, 2h, 4h, ...
-- up to p_max_wait. (pgembed.retry_failures() re-queues everything at once, for a DBA.)
CREATE OR REPLACE FUNCTION pgembed.retry_parked_failures(p_min_wait interval,
                                                         p_max_wait interval DEFAULT '7 days')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    WITH due AS (
        UPDATE pgembed.failures f SET parked_at = NULL, attempts = 0
         WHERE f.parked_at IS NOT NULL
           AND f.parked_at + least(p_max_wait, greatest(p_min_wait, f.parked_at - f.first_failed_at)) <= now()
        RETURNING f.pipeline, f.key
    )
    INSERT INTO pgembed.outbox AS q (pipeline, key, purpose)
    SELECT pipeline, key, 'retry' FROM due
    ON CONFLICT (pipeline, key) DO UPDATE
       SET attempts = 0,
           available_at = CASE WHEN q.lease_id IS NULL THEN now() ELSE q.available_at END;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_catalog.pg_notify('pgembed', '');
    END IF;
    RETURN n;
END
$$;

-- IVFFlat upkeep plan, one row per ivfflat pipeline. An IVFFlat index is trained on the rows
-- present when it is built: the one create_pipeline makes on an empty table is useless, so
-- a worker rebuilds it once the table holds p_min_rows vectors, with lists = rows / 1000
-- (sqrt(rows) past a million, at least 10; an explicit index_options.lists wins). Later,
-- when the table has grown p_rebuild_factor times, the plan says so ('rebuild_advised').
--   action: 'wait' (too few rows), 'build', 'rebuild_advised', 'ok'
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
    ops text;
BEGIN
    FOR p IN SELECT * FROM pgembed.pipelines q WHERE q.index_type = 'ivfflat' ORDER BY q.name LOOP
        pipeline := p.name;
        destination := p.destination;
        EXECUTE format('SELECT count(*) FROM pgembed.%I', p.destination) INTO row_count;
        SELECT * INTO b FROM pgembed.index_builds ib WHERE ib.pipeline = p.name;
        built_rows := b.rows_at_build;
        built_lists := b.lists;
        lists := coalesce((p.index_options ->> 'lists')::int,
                          CASE WHEN row_count <= 1000000 THEN greatest(10, row_count / 1000)
                               ELSE ceil(sqrt(row_count)) END);
        -- the recorded index must still exist and be valid (a failed CONCURRENTLY build is not)
        SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
                        WHERE c.relname = b.index_name AND c.relnamespace = 'pgembed'::regnamespace
                          AND i.indisvalid)
          INTO current_ok;
        action := CASE
            WHEN row_count < greatest(p_min_rows, 1) THEN 'wait'
            WHEN b.pipeline IS NULL OR NOT current_ok THEN 'build'
            WHEN row_count >= b.rows_at_build * p_rebuild_factor THEN 'rebuild_advised'
            ELSE 'ok' END;
        index_name := left(p.destination, 40) || '_ivfflat_'
                      || to_char(clock_timestamp(), 'YYYYMMDDHH24MISS');
        ops := CASE p.distance WHEN 'cosine' THEN 'vector_cosine_ops'
                               WHEN 'l2' THEN 'vector_l2_ops' ELSE 'vector_ip_ops' END;
        create_sql := format('CREATE INDEX CONCURRENTLY %I ON pgembed.%I USING ivfflat (embedding %s.%s) '
                             'WITH (lists = %s)', index_name, p.destination,
                             pgembed.vector_schema(), ops, lists);
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

-- HNSW indexes put off while a large backfill loads: create_pipeline decides (at least
-- pgembed.defer_index_rows() rows queued), a worker builds the index CONCURRENTLY once the
-- pipeline has no backfill rows left, then deletes the row.

-- Below this many rows a backfill goes straight into the index: building it afterwards
-- saves little, and the index is there at once.
CREATE OR REPLACE FUNCTION pgembed.defer_index_rows()
RETURNS bigint
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT 10000::bigint $$;

-- Deferred indexes whose backfill is over, with the statements that build them (outside a
-- transaction: CONCURRENTLY) and that first drop what an interrupted build left (an
-- INVALID index of the same kind on the destination).
CREATE OR REPLACE FUNCTION pgembed.deferred_index_plan()
RETURNS TABLE (pipeline text, create_sql text, drop_sql text[])
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.name, pgembed.vector_index_sql(p, true),
           ARRAY(SELECT format('DROP INDEX CONCURRENTLY IF EXISTS pgembed.%I', c.relname)
                   FROM pg_catalog.pg_index i
                   JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
                   JOIN pg_catalog.pg_am am ON am.oid = c.relam
                  WHERE i.indrelid = format('pgembed.%I', p.destination)::regclass
                    AND am.amname = p.index_type AND NOT i.indisvalid
                  ORDER BY c.relname)
      FROM pgembed.deferred_indexes d
      JOIN pgembed.pipelines p ON p.name = d.pipeline
     WHERE NOT EXISTS (SELECT 1 FROM pgembed.outbox o
                        WHERE o.pipeline = d.pipeline AND o.purpose = 'backfill')
     ORDER BY p.name;
$$;

-- pgembed shared rate limits: one request and token budget per API key, kept here so that
-- every worker, on every host, spends from the same budget. Re-runnable: tables IF NOT
-- EXISTS, functions and views CREATE OR REPLACE.
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

CREATE TABLE IF NOT EXISTS pgembed.rate_limits (
    bucket          text PRIMARY KEY,
    -- NULL: that dimension is not limited
    max_requests    int,
    max_tokens      bigint,
    per_seconds     double precision NOT NULL DEFAULT 60,
    burst_seconds   double precision NOT NULL DEFAULT 1,
    -- for the people reading this table; never the key itself
    base_url        text,
    key_fingerprint text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT "rate_limits: bucket must be 1 to 500 characters"
        CHECK (length(bucket) BETWEEN 1 AND 500),
    CONSTRAINT "rate_limits: max_requests must be > 0 or NULL"
        CHECK (max_requests > 0),
    CONSTRAINT "rate_limits: max_tokens must be > 0 or NULL"
        CHECK (max_tokens > 0),
    CONSTRAINT "rate_limits: per_seconds must be 0.1 to 86400"
        CHECK (per_seconds BETWEEN 0.1 AND 86400),
    CONSTRAINT "rate_limits: burst_seconds must be > 0"
        CHECK (burst_seconds > 0 AND burst_seconds <= 86400),
    CONSTRAINT "rate_limits: key_fingerprint must be 16 hex digits"
        CHECK (key_fingerprint ~ '^[0-9a-f]{16}$')
);

-- The moving part of each limited bucket, created by the first take_budget; kept apart from
-- the budgets so that a DBA's UPDATE of a budget never waits behind the workers.
CREATE TABLE IF NOT EXISTS pgembed.rate_limit_state (
    bucket           text PRIMARY KEY
                     REFERENCES pgembed.rate_limits ON DELETE CASCADE ON UPDATE CASCADE,
    -- the ring: slot number floor(epoch / slot_seconds) lives at index (number % 61) + 1
    slot_seconds     double precision NOT NULL,
    head_slot        bigint NOT NULL,
    request_slots    bigint[] NOT NULL,
    token_slots      bigint[] NOT NULL,
    -- the pacer: what it holds, as of paced_at (epoch seconds)
    request_level    double precision NOT NULL DEFAULT 0,
    token_level      double precision NOT NULL DEFAULT 0,
    paced_at         double precision NOT NULL,
    -- for pgembed.rate_limit_status
    granted_requests bigint NOT NULL DEFAULT 0,
    granted_tokens   bigint NOT NULL DEFAULT 0,
    waits            bigint NOT NULL DEFAULT 0,
    last_grant_at    timestamptz
) WITH (fillfactor = 50);  -- room on the page for HOT updates: this row changes constantly

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
              WHERE schemaname = 'pgembed' LOOP
        EXECUTE format('GRANT SELECT ON %s TO pgembed_reader', v);
    END LOOP;
END
$$;
GRANT EXECUTE ON FUNCTION pgembed.gaps(text), pgembed.pipeline_counts(text) TO pgembed_reader;

-- The worker: reads pipelines and models, leases and acknowledges queue rows, keeps the
-- embedding cache, records failures and usage, keeps its heartbeat row, spends the shared
-- rate-limit budget (pgembed.take_budget runs with the caller's rights).
GRANT SELECT ON pgembed.pipelines, pgembed.models TO pgembed_worker;
GRANT SELECT, UPDATE, DELETE ON pgembed.outbox TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgembed.failures TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE ON pgembed.embedding_cache TO pgembed_worker;
GRANT INSERT ON pgembed.usage TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgembed.workers TO pgembed_worker;
GRANT SELECT ON pgembed.rate_limits TO pgembed_worker;
GRANT SELECT, INSERT, UPDATE ON pgembed.rate_limit_state TO pgembed_worker;
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


-- Every pipeline's code, generated again by the generator above (which creates its
-- triggers unconditionally, so they go first).
DO $$
DECLARE
    p pgembed.pipelines;
    ev text;
BEGIN
    FOR p IN SELECT * FROM pgembed.pipelines q
              WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = q.source) LOOP
        FOREACH ev IN ARRAY '{insert,update,delete,truncate}'::text[] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'pgembed_' || p.id || '_' || ev, p.source);
        END LOOP;
        PERFORM pgembed.generate_pipeline_code(p);
    END LOOP;
END
$$;
