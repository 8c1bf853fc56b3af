-- Revision 0003, downgrade: back to the tables of 0002. The definitions of 0002
-- (0003_failure_classes_and_dead_workers.down.definitions.sql, frozen) are applied right
-- after this file; its last step drops the functions that 0002 did not define.

-- Views that read what goes go first (0002's definitions recreate theirs); binding views
-- follow their tables and stay.
DO $$
DECLARE
    doomed text;
BEGIN
    SELECT pg_catalog.string_agg(c.oid::pg_catalog.regclass::text, ', ') INTO doomed
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace = 'pgembed'::regnamespace AND c.relkind = 'v'
       AND c.relname !~ '^p[0-9]+_(content|cost_center)$';
    IF doomed IS NOT NULL THEN
        EXECUTE 'DROP VIEW ' || doomed;
    END IF;
END
$$;

-- Functions 0003's definitions made that 0002's do not: the sweep at the end of 0002's
-- definitions keeps whatever this transaction made, and a downgrade past 0003 made them.
DROP FUNCTION IF EXISTS pgembed.acknowledge(text, uuid, jsonb, bigint[], text[], int[], int[], text[], bytea[],
                                            bytea[], anyarray, int[], int[], text, int, jsonb, text, int,
                                            double precision);
DROP FUNCTION IF EXISTS pgembed.store_chunks(text, jsonb[], int[], int[], int[], text[], bytea[], bytea[], anyarray);
DROP FUNCTION IF EXISTS pgembed.failure_class(text);
DROP FUNCTION IF EXISTS pgembed.requeue_parked(text, text, interval, interval);
DROP FUNCTION IF EXISTS pgembed.retry_failures(text, text);

ALTER TABLE pgembed.failures DROP COLUMN class;
DROP TABLE pgembed.failure_classes;

-- 0002 knew no dead workers: their rows go, as 0002 removed them.
DELETE FROM pgembed.workers WHERE state = 'dead';
ALTER TABLE pgembed.workers DROP CONSTRAINT workers_state_check;
ALTER TABLE pgembed.workers
    ADD CONSTRAINT workers_state_check CHECK (state IN ('running', 'stopping'));
