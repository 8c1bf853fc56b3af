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
