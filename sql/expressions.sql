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
