-- Revision 0004, downgrade: back to the tables of 0003. Pipelines go back to chunk_tokens
-- alone (a recursive or markdown pipeline becomes cl100k windows of its size).
--
-- Each pipeline's store goes back to 0003's signature (no truncated flag) as a stand-in that
-- refuses to run: 0003's definitions, applied next (…down.definitions.sql), regenerate every
-- pipeline's code.

DO $$
DECLARE
    p record;
    f text;
BEGIN
    FOR p IN SELECT id, destination FROM pgembed.pipelines LOOP
        FOR f IN SELECT q.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc q
                  WHERE q.pronamespace = 'pgembed'::regnamespace AND q.proname = 'p' || p.id || '_store' LOOP
            EXECUTE 'DROP FUNCTION ' || f;
        END LOOP;
        EXECUTE format('CREATE FUNCTION pgembed.%I(keys jsonb[], chunk_seqs int[], chunks text[], '
                       'content_hashes bytea[], chunk_hashes bytea[], embeddings %s.vector[]) RETURNS void '
                       'LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS %L',
                       'p' || p.id || '_store', pgembed.vector_schema(),
                       'BEGIN RAISE EXCEPTION ''pgembed: this store awaits its pipeline''''s code: run pgembed init''; END');
        IF to_regclass(format('pgembed.%I', p.destination)) IS NOT NULL THEN
            EXECUTE format('ALTER TABLE pgembed.%I DROP COLUMN IF EXISTS truncated', p.destination);
        END IF;
    END LOOP;
END
$$;

ALTER TABLE pgembed.pipelines DROP CONSTRAINT pipelines_chunking_size;
ALTER TABLE pgembed.pipelines DROP COLUMN chunking, DROP COLUMN chunk_prefix;
ALTER TABLE pgembed.models DROP COLUMN tokenizer;

-- Functions whose arguments changed in 0004 go, every overload: 0003's definitions, applied
-- next, create theirs, and two overloads of one name would make every call ambiguous. So do
-- the functions 0004 added: in a downgrade past 0004 they were made in this transaction,
-- which the sweep at the end of the definitions keeps.
DO $$
DECLARE
    f text;
BEGIN
    FOR f IN SELECT q.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc q
              WHERE q.pronamespace = 'pgembed'::regnamespace
                AND q.proname IN ('acknowledge', 'store_chunks', 'create_pipeline', 'create_pipeline_on_path',
                                  'chunking_settings', 'nearest_chunks_sql', 'prefixed_content', 'search') LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$$;
