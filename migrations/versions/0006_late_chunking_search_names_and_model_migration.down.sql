-- Revision 0006, downgrade: back to the tables of 0005. Sections in the reverse order of
-- the upgrade's.

-- ---------------------------------------------------------------------------------------
-- Model migrations and the live lane
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- Stable search names and evaluation
-- ---------------------------------------------------------------------------------------

-- (none yet)

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

-- (none yet)

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
                    '',
                    -- indexes that wait for their data
                    'search', 'nearest_chunks_sql', 'search_filter_sql', 'ivfflat_probes',
                    'ivfflat_rows_per_list', 'ivfflat_lists', 'deferred_index_built',
                    -- stable search names and evaluation
                    '',
                    -- model migrations and the live lane
                    ''
                ) LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$$;
