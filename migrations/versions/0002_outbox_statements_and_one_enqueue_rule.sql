-- Revision 0002, upgrade: the tables of every database at revision 0001 -- as first shipped,
-- or as made by a later build that changed sql/ under the same revision number -- to one
-- shape. Each statement therefore checks what is there. The definitions (functions, views,
-- grants) and every pipeline's generated code are applied afterwards, from sql/.

-- The bound cost_center expression (later builds of 0001 had it).
ALTER TABLE pgembed.pipelines ADD COLUMN IF NOT EXISTS cost_center_bound text;

-- No foreign key from the queue to pipelines: its check locked the pipeline row in every
-- application transaction that wrote a source row. drop_pipeline deletes the queue itself.
ALTER TABLE pgembed.outbox DROP CONSTRAINT IF EXISTS outbox_pipeline_fkey;

-- A lease is one claim by one worker: lease_id and leased_by are set and cleared together.
UPDATE pgembed.outbox SET leased_by = NULL WHERE lease_id IS NULL AND leased_by IS NOT NULL;
UPDATE pgembed.outbox SET leased_by = 'unknown' WHERE lease_id IS NOT NULL AND leased_by IS NULL;
ALTER TABLE pgembed.outbox
    ADD CONSTRAINT outbox_lease_holder CHECK ((lease_id IS NULL) = (leased_by IS NULL));

-- Keys of one statement that queued many rows. Later builds of 0001 called the table
-- outbox_batches; "batch" now means only what a worker claims at once.
DO $$
DECLARE
    old_name name;
BEGIN
    IF pg_catalog.to_regclass('pgembed.outbox_batches') IS NOT NULL THEN
        ALTER TABLE pgembed.outbox_batches RENAME TO outbox_statements;
        -- its constraints (primary key, NOT NULL) and sequence are named after the table
        FOR old_name IN SELECT conname FROM pg_catalog.pg_constraint
                         WHERE conrelid = 'pgembed.outbox_statements'::regclass
                           AND conname LIKE 'outbox\_batches\_%' LOOP
            EXECUTE format('ALTER TABLE pgembed.outbox_statements RENAME CONSTRAINT %I TO %I',
                           old_name, replace(old_name, 'outbox_batches_', 'outbox_statements_'));
        END LOOP;
        ALTER SEQUENCE pgembed.outbox_batches_id_seq RENAME TO outbox_statements_id_seq;
    ELSE
        CREATE TABLE pgembed.outbox_statements (
            id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            pipeline        text NOT NULL,
            keys            text[] NOT NULL,
            key_count       int NOT NULL,
            expanded        int NOT NULL DEFAULT 0,
            queued_at       timestamptz NOT NULL DEFAULT now()
        );
        ALTER TABLE pgembed.outbox_statements ALTER COLUMN keys SET STORAGE EXTERNAL;
    END IF;
END
$$;

-- What each audit run found per pipeline (later builds of 0001 had it).
CREATE TABLE IF NOT EXISTS pgembed.audit_findings (
    run               bigint NOT NULL REFERENCES pgembed.audit_runs ON DELETE CASCADE,
    pipeline          text NOT NULL,
    missing           bigint NOT NULL,
    orphaned          bigint NOT NULL,
    stale             bigint NOT NULL,
    failed            bigint NOT NULL,
    gaps_since        timestamptz,
    PRIMARY KEY (pipeline, run)
);
-- rows with nothing to embed (NULL or blank content), counted apart from the gaps
ALTER TABLE pgembed.audit_findings ADD COLUMN IF NOT EXISTS empty bigint NOT NULL DEFAULT 0;
