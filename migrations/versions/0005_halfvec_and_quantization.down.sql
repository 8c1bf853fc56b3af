-- Revision 0005, downgrade: back to the tables of 0004, where every destination holds
-- vector(n) indexed by the vectors themselves. A halfvec or quantized pipeline's index
-- goes, its column becomes vector(n) again (its values widened, not re-embedded), and it
-- gets the index 0004 would have given it: the same kind up to 2,000 dimensions, none above.

DO $$
DECLARE
    p record;
    i record;
    vs text := (SELECT quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                  JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    FOR p IN SELECT * FROM pgembed.pipelines WHERE storage <> 'vector' OR quantization <> 'none' LOOP
        IF to_regclass(format('pgembed.%I', p.destination)) IS NULL THEN
            CONTINUE;
        END IF;
        FOR i IN SELECT c.relname FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class c ON c.oid = x.indexrelid
                  WHERE x.indrelid = format('pgembed.%I', p.destination)::regclass AND NOT x.indisprimary LOOP
            EXECUTE format('DROP INDEX pgembed.%I', i.relname);
        END LOOP;
        EXECUTE format('ALTER TABLE pgembed.%I ALTER COLUMN embedding TYPE %s.vector(%s)',
                       p.destination, vs, p.dimensions);
        IF p.dimensions > 2000 THEN
            UPDATE pgembed.pipelines SET index_type = 'none', index_options = '{}', quantization = 'none',
                   rerank = NULL WHERE name = p.name;
            DELETE FROM pgembed.deferred_indexes WHERE pipeline = p.name;
        ELSIF p.index_type <> 'none' THEN
            EXECUTE format('CREATE INDEX ON pgembed.%I USING %s (embedding %s.%s)%s', p.destination,
                           p.index_type, vs, CASE p.distance WHEN 'cosine' THEN 'vector_cosine_ops'
                                                            WHEN 'l2' THEN 'vector_l2_ops' ELSE 'vector_ip_ops' END,
                           coalesce((SELECT ' WITH (' || string_agg(format('%s = %s', key, (value #>> '{}')::int), ', ')
                                            || ')' FROM jsonb_each(p.index_options)), ''));
        END IF;
    END LOOP;
END
$$;

ALTER TABLE pgembed.pipelines DROP CONSTRAINT pipelines_quantization_index,
                              DROP CONSTRAINT pipelines_quantization_rerank;
ALTER TABLE pgembed.pipelines DROP COLUMN storage, DROP COLUMN quantization, DROP COLUMN rerank;

-- Functions whose arguments changed in 0005 go, every overload: 0004's definitions, applied
-- next, create theirs, and two overloads of one name would make every call ambiguous. So do
-- the functions 0005 added: in a downgrade past 0005 they were made in this transaction,
-- which the sweep at the end of the definitions keeps.
DO $$
DECLARE
    f text;
BEGIN
    FOR f IN SELECT q.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc q
              WHERE q.pronamespace = 'pgembed'::regnamespace
                AND q.proname IN ('create_pipeline', 'create_pipeline_on_path', 'embedding_type',
                                  'index_expression', 'index_max_dimensions', 'index_opclass',
                                  'storage_settings') LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$$;
