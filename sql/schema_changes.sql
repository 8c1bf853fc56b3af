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
