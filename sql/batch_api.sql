-- The provider's Batch API (pgembed/batch_api/): a backfill or migration backlog embedded
-- by OpenAI's Batch API at half price, within 24 hours, instead of by the workers.
--
-- A batch takes its rows out of the normal path by leasing them, as a worker's claim does,
-- for longer (the provider's window and a margin) and under its own lease id: no worker
-- claims them meanwhile, an application change bumps their version as for any lease, and
-- the collection stores through pgembed.acknowledge, fenced by that lease and the versions
-- recorded here (pgembed.provider_batch_rows). A batch that is never collected gives its
-- rows back when the lease runs out, as a dead worker's do.
--
-- States (pgembed.provider_batches.state): preparing (rows leased, nothing sent yet),
-- submitted (the provider has it), collected or cancelled (its rows stored or given back).

-- Leases up to p_limit ready bulk rows (backfill, repair, migration) of one pipeline to a
-- new batch and records them at their version; returns the batch's id and lease, none when
-- there was nothing to take. Live rows (sync, retry) are left to the workers: someone is
-- waiting for those.
CREATE OR REPLACE FUNCTION pgembed.batch_api_claim(p_pipeline text, p_limit int, p_lease_seconds double precision,
                                                   OUT batch bigint, OUT lease uuid, OUT claimed int)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
BEGIN
    SELECT * INTO p FROM pgembed.pipelines q WHERE q.name = p_pipeline;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgembed: no pipeline %', p_pipeline USING ERRCODE = 'undefined_object';
    END IF;
    lease := gen_random_uuid();
    INSERT INTO pgembed.provider_batches (pipeline, lease, model, dimensions)
    VALUES (p.name, lease, p.model, p.dimensions)
    RETURNING id INTO batch;
    WITH ready AS (
        SELECT o.key FROM pgembed.outbox o
         WHERE o.pipeline = p.name AND o.available_at <= now() AND o.purpose NOT IN ('sync', 'retry')
         ORDER BY o.available_at LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), taken AS (
        UPDATE pgembed.outbox o
           SET lease_id = lease, leased_by = 'batch-api:' || batch,
               available_at = now() + make_interval(secs => p_lease_seconds)
          FROM ready
         WHERE o.pipeline = p.name AND o.key = ready.key
        RETURNING o.key, o.version, o.purpose, o.attempts
    )
    INSERT INTO pgembed.provider_batch_rows (batch, key, version, purpose, attempts)
    SELECT batch, t.key, t.version, t.purpose, t.attempts FROM taken t;
    GET DIAGNOSTICS claimed = ROW_COUNT;
    IF claimed = 0 THEN
        DELETE FROM pgembed.provider_batches b WHERE b.id = batch;
        batch := NULL;
        lease := NULL;
    ELSE
        UPDATE pgembed.provider_batches b SET rows = claimed WHERE b.id = batch;
    END IF;
END
$$;

-- The provider accepted the batch: its id and input file, and what was sent.
CREATE OR REPLACE FUNCTION pgembed.batch_api_submitted(p_batch bigint, p_provider_id text, p_input_file text,
                                                       p_lines int, p_inputs int)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE pgembed.provider_batches
       SET state = 'submitted', provider_id = p_provider_id, input_file = p_input_file,
           lines = p_lines, inputs = p_inputs, submitted_at = now(), provider_status = 'validating'
     WHERE id = p_batch AND state = 'preparing';
$$;

-- Rows of an open batch changed (or deleted) since it read them go back to their place in
-- line now, rather than when the batch is collected: their batch vector would be of the
-- old text anyway. Returns how many. (A poll runs it; the collection would do the same.)
CREATE OR REPLACE FUNCTION pgembed.batch_api_release_changed(p_batch bigint)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE pgembed.outbox o
       SET lease_id = NULL, leased_by = NULL, available_at = LEAST(o.queued_at, now())
      FROM pgembed.provider_batches b, pgembed.provider_batch_rows r
     WHERE b.id = p_batch AND b.state IN ('preparing', 'submitted')
       AND r.batch = b.id AND o.pipeline = b.pipeline AND o.key = r.key
       AND o.lease_id = b.lease AND o.version <> r.version;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- The end of a batch, once: the usage it was billed (p_usage: a jsonb array of objects with
-- purpose, cost_center, requests, inputs, tokens), at the Batch API's price (price_factor
-- 0.5; p_price_factor), and every row it still holds back to its place in line, in the lane
-- it was queued in (its purpose is untouched), for the workers. A batch already finished
-- is left alone, so a collection repeated after a crash records nothing twice. Returns
-- whether this call finished it, and how many rows it gave back.
CREATE OR REPLACE FUNCTION pgembed.batch_api_finish(p_batch bigint, p_state text, p_provider_status text,
                                                    p_usage jsonb, p_price_factor numeric, p_stored int,
                                                    OUT finished boolean, OUT requeued int)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    b pgembed.provider_batches;
    n int;
BEGIN
    SELECT * INTO b FROM pgembed.provider_batches q WHERE q.id = p_batch FOR UPDATE;
    finished := FOUND AND b.state IN ('preparing', 'submitted');
    requeued := 0;
    IF NOT finished THEN
        RETURN;
    END IF;
    UPDATE pgembed.outbox o
       SET lease_id = NULL, leased_by = NULL, available_at = LEAST(o.queued_at, now())
     WHERE o.pipeline = b.pipeline AND o.lease_id = b.lease;
    GET DIAGNOSTICS n = ROW_COUNT;
    requeued := n;
    INSERT INTO pgembed.usage (pipeline, model, purpose, cost_center, requests, inputs, tokens,
                               cache_hits, cache_misses, worker, price_factor)
    SELECT b.pipeline, b.model, u.purpose, u.cost_center, u.requests, u.inputs, u.tokens,
           0, u.inputs, 'batch-api:' || b.id, p_price_factor
      FROM jsonb_to_recordset(p_usage) AS u(purpose text, cost_center text, requests int, inputs int,
                                             tokens bigint)
     WHERE u.requests > 0;
    UPDATE pgembed.provider_batches q
       SET state = p_state, provider_status = coalesce(p_provider_status, q.provider_status),
           stored = p_stored, requeued = n, finished_at = now(), checked_at = now()
     WHERE q.id = p_batch;
END
$$;

-- What each batch is doing: rows still held, stored, given back.
CREATE OR REPLACE VIEW pgembed.provider_batch_status AS
SELECT b.id, b.pipeline, b.state, b.provider_status, b.provider_id, b.rows, b.lines, b.inputs,
       (SELECT count(*) FROM pgembed.outbox o
         WHERE o.pipeline = b.pipeline AND o.lease_id = b.lease AND o.available_at > now()) AS held,
       b.stored, b.requeued, b.created_at, b.submitted_at, b.checked_at, b.finished_at
  FROM pgembed.provider_batches b;
