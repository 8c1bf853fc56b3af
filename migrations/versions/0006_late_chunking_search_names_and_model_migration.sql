-- Revision 0006, upgrade: late chunking, indexes that wait for their data, stable search
-- names, evaluation sets and runs, model migrations and the live lane. The definitions
-- (functions, views, grants) and every pipeline's generated code are applied afterwards,
-- from sql/.

-- ---------------------------------------------------------------------------------------
-- Late chunking
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- Indexes that wait for their data
-- ---------------------------------------------------------------------------------------

-- An IVFFlat index made before 0006 on an empty table and never trained since (no
-- index_builds row) goes; the pipeline's index is deferred, as a new one's is, and a worker
-- builds it once the destination holds enough rows (pgembed.deferred_index_plan). Until
-- then its searches are exact, where the untrained index answered from empty lists.
DO $$
DECLARE
    ix text;
BEGIN
    FOR ix IN SELECT format('pgembed.%I', c.relname)
                FROM pgembed.pipelines p
                JOIN pg_catalog.pg_index i ON i.indrelid = format('pgembed.%I', p.destination)::regclass
                JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
                JOIN pg_catalog.pg_am am ON am.oid = c.relam
               WHERE p.index_type = 'ivfflat' AND am.amname = 'ivfflat'
                 AND NOT EXISTS (SELECT 1 FROM pgembed.index_builds b WHERE b.pipeline = p.name) LOOP
        EXECUTE 'DROP INDEX ' || ix;
    END LOOP;
END
$$;
INSERT INTO pgembed.deferred_indexes (pipeline, rows_queued)
SELECT p.name, 0 FROM pgembed.pipelines p
 WHERE p.index_type = 'ivfflat'
   AND NOT EXISTS (SELECT 1 FROM pgembed.index_builds b WHERE b.pipeline = p.name)
ON CONFLICT (pipeline) DO NOTHING;

-- ---------------------------------------------------------------------------------------
-- Stable search names and evaluation
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- Model migrations and the live lane
-- ---------------------------------------------------------------------------------------

-- (none yet)
