-- pgembed outbox: the queue of keys to embed. One rule puts a key in it (pgembed.enqueue),
-- one definition says what state a queued row is in (pgembed.outbox_state), and pgembed.claim
-- leases rows to workers. Keys of statements that changed many rows wait in
-- pgembed.outbox_statements until a claim expands them.
--
-- The states of a key, defined here and used by every view and status line:
--   queued     in the outbox and ready: available_at has come (a lease that expired counts:
--              its worker is gone or too slow, and any worker may claim the row again)
--   in_flight  leased by a worker whose lease has not expired (lease_id set, available_at
--              in the future: the lease's expiry)
--   retrying   failed, backing off: no lease, available_at in the future
--   parked     failed too often: out of the outbox, in pgembed.failures with parked_at set,
--              until a DBA (or the scheduled retry) queues it again
-- The keys of an unexpanded statement (pgembed.outbox_statements) count as queued.

-- No SET clause and qualified operators: PostgreSQL inlines it into the views' counts.
CREATE OR REPLACE FUNCTION pgembed.outbox_state(p_lease_id uuid, p_available_at timestamptz)
RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN p_available_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN 'queued'
                WHEN p_lease_id IS NOT NULL THEN 'in_flight'
                ELSE 'retrying' END
$$;

-- Queues keys of one pipeline: the one rule every path uses (the capture triggers, backfill
-- and repair, the expansion of a statement's keys, retries of failures, the audit). A key
-- not in the outbox is inserted, ready at once, with p_purpose. A key already there is
-- bumped: its version goes up (so a worker holding an older version does not acknowledge
-- it away: the new content gets embedded too), its attempts start again from 0, its
-- purpose stays unless the bump is live ('sync', 'retry') and the key was queued for bulk
-- work (backfill, repair, migration): then it moves to the live lane (see claim_from), or a
-- row the application keeps changing would wait behind the whole backlog; and by state:
--   queued     keeps its place in line (moving it to the back on every change would starve
--              a hot row behind any backlog; leaving the indexed available_at alone lets the
--              bump be a HOT update)
--   retrying   becomes ready now: something changed, so the backoff no longer applies
--   in_flight  keeps its lease untouched: the worker holding it goes on, its acknowledgement
--              sees the newer version and leaves the row queued for the next claim
-- Returns how many keys were queued or bumped, and wakes the workers when there were any.
CREATE OR REPLACE FUNCTION pgembed.enqueue(p_pipeline text, p_keys jsonb[], p_purpose text DEFAULT 'sync',
                                           p_changed_at timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgembed.outbox AS q (pipeline, key, purpose, queued_at, changed_at)
    SELECT p_pipeline, k, p_purpose, p_changed_at, p_changed_at FROM unnest(p_keys) AS k
    ON CONFLICT (pipeline, key) DO UPDATE
       SET version = q.version + 1, attempts = 0,
           -- a live change of a row queued for bulk work (a backfill, a repair, a migration)
           -- moves it to the live lane: the application changed it, it is no longer bulk
           purpose = CASE WHEN excluded.purpose IN ('sync', 'retry') THEN excluded.purpose ELSE q.purpose END,
           changed_at = GREATEST(q.changed_at, excluded.changed_at),
           available_at = CASE pgembed.outbox_state(q.lease_id, q.available_at)
                              WHEN 'in_flight' THEN q.available_at
                              ELSE LEAST(q.available_at, now()) END;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pgembed', p_pipeline);
    END IF;
    RETURN n;
END
$$;

-- Queues every row of a pipeline's source table (backfill, repair).
CREATE OR REPLACE FUNCTION pgembed.queue_all(p_pipeline text, p_purpose text DEFAULT 'backfill')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- the settings of pgembed.pinned_settings(): keys and content render alike everywhere
SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
SET bytea_output = 'hex'
SET lc_monetary = 'C'
SET lc_numeric = 'C'
SET lc_time = 'C'
AS $$
DECLARE
    p pgembed.pipelines;
    keys jsonb[];
BEGIN
    SELECT * INTO STRICT p FROM pgembed.pipelines WHERE name = p_pipeline;
    EXECUTE format('SELECT ARRAY(SELECT jsonb_build_array(%s) FROM %s n)',
                   pgembed.sql_list('n.%1$I::text', p.key_columns), p.source)
       INTO keys;
    RETURN pgembed.enqueue(p.name, keys, p_purpose);
END
$$;

-- Moves the keys of a pipeline's pending statements into the outbox, until about p_keys
-- keys have moved, and returns how many did. claim() calls it before it looks for ready
-- rows. A big statement goes in slices (`expanded` counts what has moved), so no claim
-- holds a transaction open for a million-row statement. A statement another worker is
-- expanding is skipped (SKIP LOCKED). Keys are queued by the one rule (pgembed.enqueue), as
-- changed when the statement ran. The insert waits for an application transaction queueing
-- one of the same keys; past a short lock_timeout the statement is left for a later claim,
-- so such a transaction and this one never deadlock.
-- SECURITY DEFINER (EXECUTE for pgembed_worker, see privileges.sql): it only moves keys the
-- triggers wrote, so a worker needs no INSERT on the outbox, which would let it queue rows.
CREATE OR REPLACE FUNCTION pgembed.expand_statements(p_pipeline text, p_keys bigint DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s record;
    n int;
    moved bigint := 0;
    timeout text := current_setting('lock_timeout');
BEGIN
    WHILE moved < p_keys LOOP
        SELECT x.id, x.keys[x.expanded + 1 : x.expanded + (p_keys - moved)::int] AS part,
               x.expanded, x.key_count, x.queued_at
          INTO s
          FROM pgembed.outbox_statements x
         WHERE x.pipeline = p_pipeline
         ORDER BY x.id LIMIT 1
           FOR UPDATE SKIP LOCKED;
        EXIT WHEN NOT FOUND;
        n := coalesce(cardinality(s.part), 0);
        BEGIN
            PERFORM set_config('lock_timeout', '100ms', true);
            PERFORM pgembed.enqueue(p_pipeline, ARRAY(SELECT jsonb_build_array(k) FROM unnest(s.part) AS k),
                                    'sync', s.queued_at);
            IF n = 0 OR s.expanded + n >= s.key_count THEN
                DELETE FROM pgembed.outbox_statements x WHERE x.id = s.id;
            ELSE
                UPDATE pgembed.outbox_statements x SET expanded = x.expanded + n WHERE x.id = s.id;
            END IF;
            PERFORM set_config('lock_timeout', timeout, true);
        EXCEPTION WHEN lock_not_available THEN
            EXIT;  -- the subtransaction's rollback restored lock_timeout
        END;
        moved := moved + n;
    END LOOP;
    RETURN moved;
END
$$;

REVOKE ALL ON FUNCTION pgembed.expand_statements(text, bigint) FROM PUBLIC;

-- Keys of pending statements (one pipeline, or all): queued, though not yet in the outbox.
CREATE OR REPLACE FUNCTION pgembed.statement_keys(p_pipeline text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(sum(s.key_count - s.expanded), 0)::bigint FROM pgembed.outbox_statements s
     WHERE p_pipeline IS NULL OR s.pipeline = p_pipeline
$$;

-- The keys of a batch as the worker sends them, one jsonb array of keys (one document to
-- encode instead of one per key), as the jsonb[] that `key = ANY(...)` takes.
CREATE OR REPLACE FUNCTION pgembed.key_array(p_keys jsonb)
RETURNS jsonb[]
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$ SELECT ARRAY(SELECT jsonb_array_elements(p_keys)) $$;

-- Whether bulk work (backfill, repair, migration rows) may be claimed now: always, unless
-- pgembed.bulk_lane sets a window (opens..closes in its time zone; a window that opens
-- after it closes spans midnight, e.g. 22:00..06:00 off-peak). A DBA sets it with
--     UPDATE pgembed.bulk_lane SET opens = '22:00', closes = '06:00', time_zone = 'Europe/Paris';
CREATE OR REPLACE FUNCTION pgembed.bulk_lane_open(p_at timestamptz DEFAULT now())
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(bool_and(CASE WHEN b.opens IS NULL THEN true
                                  WHEN b.opens < b.closes THEN t.t >= b.opens AND t.t < b.closes
                                  ELSE t.t >= b.opens OR t.t < b.closes END), true)
      FROM pgembed.bulk_lane b
     CROSS JOIN LATERAL (SELECT (p_at AT TIME ZONE b.time_zone)::time AS t) AS t
$$;

-- Claims up to p_limit ready rows of one pipeline for a worker, round robin over pipelines
-- starting after p_after so that no pipeline starves. SKIP LOCKED: workers never wait on
-- each other or on an application transaction that is touching a queued row.
-- Two lanes: live rows (purposes sync and retry: what the application changed) of every
-- pipeline are claimed before any bulk row (backfill, repair, migration), so a row inserted
-- behind a backlog of any pipeline waits one claim, not the backlog; bulk rows are claimed
-- only while the bulk lane is open (pgembed.bulk_lane_open). Each lane is oldest first.
-- claim_from is claim limited to p_only: the pipelines the worker can serve (it checked
-- their provider first), NULL for all; a pipeline created since the worker last looked is
-- not claimed until it has. (A name of its own: an upgrade keeps claim's signature.)
CREATE OR REPLACE FUNCTION pgembed.claim_from(p_worker text, p_lease uuid, p_limit int,
                                              p_lease_seconds double precision, p_after text,
                                              p_only text[])
RETURNS TABLE (pipeline text, key jsonb, version bigint, purpose text, attempts int)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pipes text[];
    pl text;
    lane text;
    ready jsonb[];
BEGIN
    -- A claim need not wait for its commit to reach the disk (a flush is some milliseconds,
    -- a quarter of a small batch's time): one lost in a crash never happened, its rows are
    -- not leased, and the acknowledgement of a lease the database forgot writes nothing but
    -- the cache and the usage it paid for. The acknowledgement's own commit is flushed, and
    -- with it every earlier one.
    PERFORM set_config('synchronous_commit', 'off', true);
    pipes := ARRAY(SELECT q.name FROM pgembed.pipelines q
                    WHERE p_only IS NULL OR q.name = ANY(p_only)
                    ORDER BY q.name <= coalesce(p_after, ''), q.name);
    FOREACH lane IN ARRAY ARRAY['live', 'bulk'] LOOP
        EXIT WHEN lane = 'bulk' AND NOT pgembed.bulk_lane_open();
        FOREACH pl IN ARRAY pipes LOOP
            IF lane = 'live' THEN
                PERFORM pgembed.expand_statements(pl);  -- a statement's keys are live rows
                ready := ARRAY(SELECT o.key FROM pgembed.outbox o  -- through outbox_live
                                WHERE o.pipeline = pl AND o.available_at <= now()
                                  AND o.purpose IN ('sync', 'retry')
                                ORDER BY o.available_at LIMIT p_limit
                                  FOR UPDATE SKIP LOCKED);
            ELSE
                ready := ARRAY(SELECT o.key FROM pgembed.outbox o
                                WHERE o.pipeline = pl AND o.available_at <= now()
                                ORDER BY o.available_at LIMIT p_limit
                                  FOR UPDATE SKIP LOCKED);
            END IF;
            CONTINUE WHEN cardinality(ready) = 0;
            RETURN QUERY
            UPDATE pgembed.outbox o
               SET lease_id = p_lease, leased_by = p_worker,
                   available_at = now() + make_interval(secs => p_lease_seconds)
             WHERE o.pipeline = pl AND o.key = ANY (ready)
            RETURNING o.pipeline, o.key, o.version, o.purpose, o.attempts;
            RETURN;
        END LOOP;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgembed.claim(p_worker text, p_lease uuid, p_limit int,
                                         p_lease_seconds double precision, p_after text DEFAULT '')
RETURNS TABLE (pipeline text, key jsonb, version bigint, purpose text, attempts int)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM pgembed.claim_from(p_worker, p_lease, p_limit, p_lease_seconds, p_after, NULL) $$;

-- Queue depth for metrics and status lines: queued (with the keys of unexpanded
-- statements), in flight, retrying; see pgembed.outbox_state.
CREATE OR REPLACE FUNCTION pgembed.queue_depth(OUT ready bigint, OUT leased bigint, OUT waiting bigint)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*) FILTER (WHERE pgembed.outbox_state(lease_id, available_at) = 'queued')
               + pgembed.statement_keys(),
           count(*) FILTER (WHERE pgembed.outbox_state(lease_id, available_at) = 'in_flight'),
           count(*) FILTER (WHERE pgembed.outbox_state(lease_id, available_at) = 'retrying')
      FROM pgembed.outbox;
$$;

-- The acknowledgement of a batch: everything a worker writes for a batch it embedded, in
-- one statement (one round trip, and no transaction left open between statements, where a
-- paused worker would hold its row locks). In order:
--   1. the new cache entries, whatever else happens (they are paid for), sorted by hash so
--      that two workers storing overlapping sets never deadlock;
--   2. the batch's rows this worker still holds (same lease, lease not expired), locked in
--      key order; rows an application transaction is changing right now are skipped (SKIP
--      LOCKED): they come round again. A worker that lost its lease writes nothing more;
--   3. of the rows held, those still at the version the worker read: their chunks go to the
--      destination through the pipeline's generated store, their outbox rows and old
--      failures go, and the failed ones are recorded with their class (record_failures);
--      rows changed since they were read go back to their place in line, unwritten;
--   4. the usage ledger's rows (p_usage: a jsonb array of objects, one per purpose and
--      cost center).
-- One entry per claimed row: p_keys (one jsonb array of keys, see key_array), p_versions,
-- p_errors (NULL: embedded, or gone). One entry per chunk: p_rows is its row (1-based
-- position in p_keys; NULL for a vector only the cache keeps, e.g. of a row another chunk
-- of which failed); a row that is gone or has no text passes one chunk whose seq is NULL,
-- which makes the store forget its vectors. p_cache_at: the chunks whose hash and vector
-- are new to the cache, with their tokens. p_embeddings is the vector[] the store takes
-- (polymorphic here: pgvector's schema is not on this file's search_path); p_truncated
-- marks the chunks that are the start of a text cut off (chunking 'truncate').
-- Returns the positions (in p_keys) of the rows that had changed and of those not held.
CREATE OR REPLACE FUNCTION pgembed.acknowledge(
    p_pipeline text, p_lease uuid, p_keys jsonb, p_versions bigint[], p_errors text[],
    p_rows int[], p_seqs int[], p_chunks text[], p_content_hashes bytea[], p_chunk_hashes bytea[],
    p_embeddings anyarray, p_truncated boolean[], p_cache_at int[], p_cache_tokens int[], p_model text,
    p_dimensions int,
    p_usage jsonb, p_worker text, p_max_attempts int, p_retry_base double precision,
    OUT changed int[], OUT skipped int[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keys jsonb[] := pgembed.key_array(p_keys);
    current int[];
    good int[];
    bad int[];
BEGIN
    INSERT INTO pgembed.embedding_cache (content_hash, model, dimensions, embedding, tokens)
    SELECT p_chunk_hashes[c.at], p_model, p_dimensions, p_embeddings[c.at], c.tokens
      FROM unnest(p_cache_at, p_cache_tokens) AS c(at, tokens)
     ORDER BY p_chunk_hashes[c.at]
    ON CONFLICT (content_hash) DO NOTHING;

    SELECT coalesce(array_agg(u.i) FILTER (WHERE h.version = u.version), '{}'),
           coalesce(array_agg(u.i) FILTER (WHERE h.version <> u.version), '{}'),
           coalesce(array_agg(u.i) FILTER (WHERE h.key IS NULL), '{}')
      INTO current, changed, skipped
      FROM unnest(keys, p_versions) WITH ORDINALITY AS u(key, version, i)
      LEFT JOIN (SELECT o.key, o.version FROM pgembed.outbox o
                  WHERE o.pipeline = p_pipeline AND o.lease_id = p_lease AND o.available_at > now()
                    AND o.key = ANY (keys)
                  ORDER BY o.key
                    FOR UPDATE SKIP LOCKED) AS h ON h.key = u.key;
    good := ARRAY(SELECT i FROM unnest(current) AS i WHERE p_errors[i] IS NULL);
    bad := ARRAY(SELECT i FROM unnest(current) AS i WHERE p_errors[i] IS NOT NULL);

    IF cardinality(good) > 0 THEN
        PERFORM pgembed.store_chunks(p_pipeline, keys, good, p_rows, p_seqs, p_chunks,
                                     p_content_hashes, p_chunk_hashes, p_embeddings, p_truncated);
        DELETE FROM pgembed.outbox o
         WHERE o.pipeline = p_pipeline AND o.key = ANY (ARRAY(SELECT keys[i] FROM unnest(good) AS i));
        DELETE FROM pgembed.failures f
         WHERE f.pipeline = p_pipeline AND f.key = ANY (ARRAY(SELECT keys[i] FROM unnest(good) AS i));
    END IF;
    IF cardinality(bad) > 0 THEN
        PERFORM pgembed.record_failures(p_pipeline, p_lease, ARRAY(SELECT keys[i] FROM unnest(bad) AS i),
                                        ARRAY(SELECT p_errors[i] FROM unnest(bad) AS i),
                                        p_max_attempts, p_retry_base);
    END IF;
    IF cardinality(changed) > 0 THEN
        -- back to its place in line (when it was first queued), not to the back
        UPDATE pgembed.outbox o
           SET lease_id = NULL, leased_by = NULL, available_at = LEAST(o.queued_at, now())
         WHERE o.pipeline = p_pipeline AND o.lease_id = p_lease
           AND o.key = ANY (ARRAY(SELECT keys[i] FROM unnest(changed) AS i));
    END IF;

    INSERT INTO pgembed.usage (pipeline, model, purpose, cost_center, requests, inputs, tokens,
                               cache_hits, cache_misses, worker)
    SELECT p_pipeline, p_model, u.purpose, u.cost_center, u.requests, u.inputs, u.tokens,
           u.cache_hits, u.cache_misses, p_worker
      FROM jsonb_to_recordset(p_usage) AS u(purpose text, cost_center text, requests int, inputs int,
                                             tokens bigint, cache_hits int, cache_misses int);
END
$$;

-- The chunks of the rows p_good (positions in p_keys) through the pipeline's generated store
-- (pgembed.p<id>_store, named by format('%I')), which replaces every chunk of those keys.
CREATE OR REPLACE FUNCTION pgembed.store_chunks(
    p_pipeline text, p_keys jsonb[], p_good int[], p_rows int[], p_seqs int[], p_chunks text[],
    p_content_hashes bytea[], p_chunk_hashes bytea[], p_embeddings anyarray, p_truncated boolean[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    id bigint := (SELECT q.id FROM pgembed.pipelines q WHERE q.name = p_pipeline);
BEGIN
    EXECUTE format('SELECT pgembed.%I(array_agg($1[u.r]), array_agg(u.seq), array_agg(u.chunk), '
                   'array_agg(u.content_hash), array_agg(u.chunk_hash), array_agg(u.embedding), '
                   'array_agg(u.truncated)) '
                   'FROM unnest($2, $3, $4, $5, $6, $7, $8) '
                   'AS u(r, seq, chunk, content_hash, chunk_hash, embedding, truncated) '
                   'WHERE u.r = ANY ($9)', 'p' || id || '_store')
      USING p_keys, p_rows, p_seqs, p_chunks, p_content_hashes, p_chunk_hashes, p_embeddings, p_truncated,
            p_good;
END
$$;

-- Write-through (pgembed/writethrough.py): an application that needs rows searchable right
-- after its commit names their keys, and its process embeds them at once instead of waiting
-- for a worker. claim_keys leases exactly those keys of one pipeline, as claim_from leases a
-- batch (same lease columns, so pgembed.acknowledge fences the write the same way), and
-- says what became of every key asked for, one row each, in p_keys' order:
--   claimed    leased under p_lease (retrying rows too: the caller asks now, so the
--              backoff no longer applies); a row queued for bulk work (backfill, repair,
--              migration) moves to the live lane, as a live change does in enqueue
--   in_flight  leased by another worker (holder: who), whose acknowledgement will store it
--   locked     its outbox row is locked by someone else right now (an application
--              transaction bumping it, another claim): ask again
--   statement  not in the outbox while a statement of the pipeline waits to be expanded
--              (expanded here first, as much as claim_from would): it may be in it; ask again
--   parked     not in the outbox, parked in pgembed.failures (error: why)
--   absent     not in the outbox: embedded already, or never queued
-- Nothing waits: SKIP LOCKED and no lock on rows not claimed.
CREATE OR REPLACE FUNCTION pgembed.claim_keys(p_pipeline text, p_worker text, p_lease uuid, p_keys jsonb,
                                              p_lease_seconds double precision)
RETURNS TABLE (key jsonb, state text, version bigint, purpose text, attempts int, holder text, error text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keys jsonb[] := pgembed.key_array(p_keys);
    ready jsonb[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);  -- as claim_from: see there
    PERFORM pgembed.expand_statements(p_pipeline);
    ready := ARRAY(SELECT o.key FROM pgembed.outbox o
                    WHERE o.pipeline = p_pipeline AND o.key = ANY (keys)
                      AND pgembed.outbox_state(o.lease_id, o.available_at) <> 'in_flight'
                    ORDER BY o.key
                      FOR UPDATE SKIP LOCKED);
    RETURN QUERY
    WITH claimed AS (
        UPDATE pgembed.outbox o
           SET lease_id = p_lease, leased_by = p_worker,
               available_at = now() + make_interval(secs => p_lease_seconds),
               purpose = CASE WHEN o.purpose IN ('sync', 'retry') THEN o.purpose ELSE 'sync' END
         WHERE o.pipeline = p_pipeline AND o.key = ANY (ready)
        RETURNING o.key, o.version, o.purpose, o.attempts
    )
    SELECT k.key,
           CASE WHEN c.key IS NOT NULL THEN 'claimed'
                WHEN o.key IS NOT NULL AND pgembed.outbox_state(o.lease_id, o.available_at) = 'in_flight'
                    THEN 'in_flight'
                WHEN o.key IS NOT NULL THEN 'locked'
                WHEN f.parked_at IS NOT NULL THEN 'parked'
                WHEN pgembed.statement_keys(p_pipeline) > 0 THEN 'statement'
                ELSE 'absent' END,
           c.version, c.purpose, c.attempts,
           CASE WHEN c.key IS NULL THEN o.leased_by END,
           CASE WHEN c.key IS NULL AND o.key IS NULL THEN f.error END
      FROM unnest(keys) WITH ORDINALITY AS k(key, i)
      LEFT JOIN claimed c ON c.key = k.key
      LEFT JOIN pgembed.outbox o ON c.key IS NULL AND o.pipeline = p_pipeline AND o.key = k.key
      LEFT JOIN pgembed.failures f ON f.pipeline = p_pipeline AND f.key = k.key
     ORDER BY k.i;
END
$$;

-- Write-through from SQL, for an application that has no Python process of pgembed's to
-- embed in: the workers do the embedding, these two put the keys first and wait for them.
--   SELECT pgembed.sync_now('notes', '[42, 43]');          -- in or after the writing transaction
--   SELECT * FROM pgembed.wait_synced('notes', '[42, 43]', 5);  -- after its COMMIT
-- A key is given as pgembed.claim_keys takes it, or (one column) as its bare value.

-- Keys given to the SQL write-through as the outbox holds them: each a jsonb array of text,
-- checked against the pipeline's key columns.
CREATE OR REPLACE FUNCTION pgembed.given_keys(p_pipeline text, p_keys jsonb)
RETURNS jsonb[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    columns int := (SELECT cardinality(q.key_columns) FROM pgembed.pipelines q WHERE q.name = p_pipeline);
    keys jsonb[];
BEGIN
    IF jsonb_typeof(p_keys) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'pgembed: keys must be a JSON array of keys, e.g. ''[42, 43]''';
    END IF;
    keys := ARRAY(SELECT CASE WHEN jsonb_typeof(k) = 'array'
                              THEN (SELECT coalesce(jsonb_agg(e #>> '{}' ORDER BY i), '[]')
                                      FROM jsonb_array_elements(k) WITH ORDINALITY AS x(e, i))
                              ELSE jsonb_build_array(k #>> '{}') END
                    FROM jsonb_array_elements(p_keys) AS k);
    IF EXISTS (SELECT 1 FROM unnest(keys) AS k
                WHERE jsonb_array_length(k) <> columns OR k @> '[null]') THEN
        RAISE EXCEPTION 'pgembed: pipeline % has a key of % column(s): give each key as % (not NULL)',
            quote_literal(p_pipeline), columns,
            CASE WHEN columns = 1 THEN 'its value' ELSE format('a list of %s values', columns) END;
    END IF;
    RETURN keys;
END
$$;

-- Puts these keys of a pipeline (or alias) at the front of the live lane and wakes the
-- workers: each is claimed by the next claim of its pipeline. A key queued for bulk work
-- moves to the live lane, a retrying one is ready now, one in flight keeps its lease; keys
-- not queued are left alone. Returns how many keys were moved. SECURITY DEFINER (no grant
-- by default): an application role the DBA grants EXECUTE can reorder the queue's rows of
-- the keys it names, and nothing else.
CREATE OR REPLACE FUNCTION pgembed.sync_now(p_target text, p_keys jsonb)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pl text := pgembed.resolve_pipeline(p_target);
    keys jsonb[] := pgembed.given_keys(pl, p_keys);
    front timestamptz;
    n bigint;
BEGIN
    SELECT LEAST(now(), min(o.available_at)) - interval '1 millisecond' INTO front
      FROM pgembed.outbox o  -- through outbox_live
     WHERE o.pipeline = pl AND o.available_at <= now() AND o.purpose IN ('sync', 'retry');
    UPDATE pgembed.outbox o
       SET available_at = LEAST(o.available_at, front),
           purpose = CASE WHEN o.purpose IN ('sync', 'retry') THEN o.purpose ELSE 'sync' END
     WHERE o.pipeline = pl AND o.key = ANY (keys)
       AND pgembed.outbox_state(o.lease_id, o.available_at) <> 'in_flight';
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pgembed', pl);
    END IF;
    RETURN n;
END
$$;

-- Waits up to p_timeout seconds until these keys are searchable (no longer in the outbox:
-- stored, or of no row) or have failed, and says which, one row a key: searchable, failed
-- (parked, or failed and backing off; error: why), queued or in_flight (still, at the
-- timeout). The wait ends early for a failure recorded since it began; one older than the
-- wait (a key sync_now did not make ready) waits for the timeout, and is failed then. Each look is a statement of its own, with its own
-- snapshot, so it sees the workers' commits; which is why it refuses to run in a
-- transaction that has written (the workers cannot see that transaction's rows until it
-- commits) or that keeps one snapshot (REPEATABLE READ, SERIALIZABLE). SECURITY DEFINER,
-- as sync_now: it reads the queue's rows of the keys named, and nothing else.
CREATE OR REPLACE FUNCTION pgembed.wait_synced(p_target text, p_keys jsonb, p_timeout double precision DEFAULT 30)
RETURNS TABLE (key jsonb, status text, error text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pl text := pgembed.resolve_pipeline(p_target);
    keys jsonb[] := pgembed.given_keys(pl, p_keys);
    began timestamptz := clock_timestamp();
    pause double precision := 0.005;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: wait_synced waits for the workers, who cannot see this transaction''s writes'
            USING HINT = 'COMMIT first, then call it (pgembed.sync_now may run before the COMMIT).';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgembed: wait_synced needs READ COMMITTED: under % it would never see the workers'' commits',
            upper(current_setting('transaction_isolation'));
    END IF;
    LOOP
        EXIT WHEN NOT EXISTS (
            SELECT 1 FROM pgembed.outbox o
              LEFT JOIN pgembed.failures f ON f.pipeline = o.pipeline AND f.key = o.key
             WHERE o.pipeline = pl AND o.key = ANY (keys)
               AND NOT (pgembed.outbox_state(o.lease_id, o.available_at) = 'retrying' AND f.last_failed_at >= began));
        EXIT WHEN clock_timestamp() >= began + make_interval(secs => p_timeout);
        PERFORM pg_sleep(LEAST(pause, GREATEST(extract(epoch FROM began + make_interval(secs => p_timeout)
                                                        - clock_timestamp()), 0)));
        pause := LEAST(pause * 2, 0.1);
    END LOOP;
    RETURN QUERY
    SELECT k.key,
           CASE WHEN f.parked_at IS NOT NULL AND o.key IS NULL THEN 'failed'
                WHEN o.key IS NULL THEN 'searchable'
                WHEN pgembed.outbox_state(o.lease_id, o.available_at) = 'retrying' AND f.key IS NOT NULL
                    THEN 'failed'
                WHEN pgembed.outbox_state(o.lease_id, o.available_at) = 'in_flight' THEN 'in_flight'
                ELSE 'queued' END,
           CASE WHEN f.parked_at IS NOT NULL
                  OR pgembed.outbox_state(o.lease_id, o.available_at) = 'retrying' THEN f.error END
      FROM unnest(keys) WITH ORDINALITY AS k(key, i)
      LEFT JOIN pgembed.outbox o ON o.pipeline = pl AND o.key = k.key
      LEFT JOIN pgembed.failures f ON f.pipeline = pl AND f.key = k.key
     ORDER BY k.i;
END
$$;
