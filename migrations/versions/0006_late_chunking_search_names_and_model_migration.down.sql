-- Revision 0006, downgrade: back to the tables of 0005. Sections in the reverse order of
-- the upgrade's.

-- ---------------------------------------------------------------------------------------
-- Model migrations and the live lane
-- ---------------------------------------------------------------------------------------

-- what depends on the tables' row type or reads them goes first
DROP VIEW pgembed.model_migration_status;
DROP FUNCTION pgembed.alias_migration(text), pgembed.migration_in(text, text[], text),
    pgembed.cutover_gate(pgembed.model_migrations);
DROP TABLE pgembed.model_migration_events;
DROP TABLE pgembed.model_migrations;
DROP TABLE pgembed.bulk_lane;
DROP INDEX pgembed.outbox_live;

-- ---------------------------------------------------------------------------------------
-- Stable search names and evaluation
-- ---------------------------------------------------------------------------------------

-- each alias's view first: it depends on its pipeline's table
DO $$
DECLARE
    a text;
BEGIN
    FOR a IN SELECT name FROM pgembed.aliases LOOP
        EXECUTE format('DROP VIEW IF EXISTS pgembed.%I', a);
    END LOOP;
END
$$;
DROP VIEW IF EXISTS pgembed.eval_regressions, pgembed.eval_history, pgembed.eval_set_summary;
DROP TABLE pgembed.eval_runs, pgembed.aliases, pgembed.eval_judgments, pgembed.eval_queries,
           pgembed.eval_sets;

-- ---------------------------------------------------------------------------------------
-- Indexes that wait for their data
-- ---------------------------------------------------------------------------------------

-- 0005 defers HNSW indexes only: an IVFFlat index still waiting is left to 0005's
-- scheduled upkeep, which builds it once the table holds its minimum of rows.
DELETE FROM pgembed.deferred_indexes d
 USING pgembed.pipelines p
 WHERE p.name = d.pipeline AND p.index_type = 'ivfflat';

-- ---------------------------------------------------------------------------------------
-- Late chunking
-- ---------------------------------------------------------------------------------------

-- Late-chunked pipelines become plain ones: their vectors stay until their rows change.
ALTER TABLE pgembed.pipelines DROP COLUMN late_chunking;

-- ---------------------------------------------------------------------------------------
-- Functions
-- ---------------------------------------------------------------------------------------

-- Functions whose arguments changed in 0006 go, every overload: 0005's definitions, applied
-- next, create theirs, and two overloads of one name would make every call ambiguous. So do
-- the functions 0006 added: in a downgrade past 0006 they were made in this transaction,
-- which the sweep at the end of the definitions keeps. One name a line, per section.
DO $$
DECLARE
    f text;
BEGIN
    FOR f IN SELECT q.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc q
              WHERE q.pronamespace = 'pgembed'::regnamespace
                AND q.proname IN (
                    -- late chunking
                    'create_pipeline', 'create_pipeline_on_path', 'check_late_chunking',
                    -- indexes that wait for their data
                    'search', 'nearest_chunks_sql', 'search_filter_sql', 'ivfflat_probes',
                    'ivfflat_rows_per_list', 'ivfflat_lists', 'deferred_index_built',
                    -- stable search names and evaluation
                    'resolve_pipeline', 'set_alias', 'write_alias_view', 'alias_views_aside', 'alias_views_back',
                    'drop_alias', 'set_alias_evaluation',
                    'import_eval_set', 'eval_set_key',
                    -- model migrations and the live lane
                    'bulk_lane_open', 'alias_migration', 'active_pipeline', 'migration_target',
                    'migration_event', 'start_migration', 'migration_in', 'migration_evaluated',
                    'cutover_gate', 'cutover_migration', 'rollback_migration', 'cleanup_migration',
                    'cleanup_due_migrations', 'target_dimensions', 'model_target',
                    'backfill_target_on_path', 'backfill_target', 'take_bulk_budget'
                ) LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$$;
