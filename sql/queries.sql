-- Named queries the worker runs. A block starts with "-- name --"; the loader in
-- pgembed/sqlfiles.py maps names to statements. Parameters are bound, never spliced.
-- Built-in functions are called as pg_catalog.f(): a lookalike earlier on the worker's
-- search_path (a schema named after its role, say) must not decide what now() is.

-- claim --
-- Lease up to `limit` ready rows of one pipeline (round robin after `after`).
SELECT pipeline, key, version, purpose, attempts
  FROM pgembed.claim(%(worker)s, %(lease)s, %(limit)s, %(lease_seconds)s, %(after)s)

-- pipelines --
SELECT p.name, p.id, p.model, p.dimensions, p.chunk_tokens, p.chunk_overlap,
       m.dimensions AS native_dimensions, m.max_input_tokens, m.max_batch_inputs,
       m.max_batch_tokens
  FROM pgembed.pipelines p
  CROSS JOIN LATERAL pgembed.model_info(p.model) AS m

-- cache_get --
SELECT content_hash, embedding FROM pgembed.embedding_cache WHERE content_hash = ANY(%(hashes)b::bytea[])

-- cache_touch --
-- Marks entries as used, at most once an hour each, so hits stay nearly write-free.
UPDATE pgembed.embedding_cache SET last_used_at = pg_catalog.now()
 WHERE content_hash = ANY(%(hashes)b::bytea[]) AND last_used_at < pg_catalog.now() - interval '1 hour'

-- cache_put --
-- Sorted by hash so that two workers storing overlapping sets never deadlock. (unnest with
-- several arrays is FROM-clause syntax, not a function call, so it cannot be qualified.)
-- The arrays travel in binary: formatting vectors as text costs more than the insert.
INSERT INTO pgembed.embedding_cache (content_hash, model, dimensions, embedding, tokens)
SELECT h, %(model)s, %(dimensions)s, e, t
  FROM unnest(%(hashes)b::bytea[], %(embeddings)b::vector[], %(tokens)b::int[]) AS u(h, e, t)
 ORDER BY h
ON CONFLICT (content_hash) DO NOTHING

-- ack_begin --
-- First statement of an acknowledgement. Its statements go back to back; a session idle
-- inside one for seconds belongs to a worker that is paused (SIGSTOP, a VM freeze) or
-- stuck, and its row locks make every other worker skip those rows. End such a session
-- soon (its lease fencing makes that safe) instead of after the session-wide timeout.
SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', '5s', true)

-- held --
-- The rows of a batch this worker still holds: same lease, lease not expired. Rows an
-- application transaction is changing right now are skipped: they come round again.
SELECT key, version FROM pgembed.outbox
 WHERE pipeline = %(pipeline)s AND lease_id = %(lease)s AND available_at > pg_catalog.now()
   AND key = ANY(pgembed.key_array(%(keys)s))
 ORDER BY key
   FOR UPDATE SKIP LOCKED

-- release_unlocked --
-- Gives back rows of a batch that `held` skipped because someone held their row lock at that
-- instant (an application statement changing them: they need embedding again). Without
-- this they would wait for the lease to expire. Rows still locked are skipped again.
UPDATE pgembed.outbox o
   SET lease_id = NULL, leased_by = NULL, available_at = LEAST(o.queued_at, pg_catalog.now())
  FROM (SELECT q.pipeline, q.key FROM pgembed.outbox q
         WHERE q.pipeline = %(pipeline)s AND q.lease_id = %(lease)s AND q.key = ANY(pgembed.key_array(%(keys)s))
           FOR UPDATE SKIP LOCKED) AS free
 WHERE o.pipeline = free.pipeline AND o.key = free.key
RETURNING o.key

-- still_leased --
-- Which of these rows are still leased under this lease (without waiting for any lock).
SELECT key FROM pgembed.outbox
 WHERE pipeline = %(pipeline)s AND lease_id = %(lease)s AND key = ANY(pgembed.key_array(%(keys)s))

-- done --
DELETE FROM pgembed.outbox WHERE pipeline = %(pipeline)s AND key = ANY(pgembed.key_array(%(keys)s))

-- clear_failures --
DELETE FROM pgembed.failures WHERE pipeline = %(pipeline)s AND key = ANY(pgembed.key_array(%(keys)s))

-- release --
-- Gives rows back, e.g. changed while they were embedded, or after an API outage. Without a
-- delay a row goes back to its place in line (when it was first queued), not to the back:
-- a row that keeps changing while it is embedded would otherwise wait behind every backlog.
UPDATE pgembed.outbox
   SET lease_id = NULL, leased_by = NULL,
       available_at = CASE WHEN %(delay)s::float8 > 0
                           THEN pg_catalog.now() + pg_catalog.make_interval(secs => %(delay)s::float8)
                           ELSE LEAST(queued_at, pg_catalog.now()) END
 WHERE pipeline = %(pipeline)s AND lease_id = %(lease)s AND key = ANY(pgembed.key_array(%(keys)s))

-- fail --
SELECT pgembed.record_failures(%(pipeline)s, %(lease)s, pgembed.key_array(%(keys)s), %(errors)b::text[],
                               %(max_attempts)s, %(retry_base)s)

-- usage --
INSERT INTO pgembed.usage (pipeline, model, purpose, cost_center, requests, inputs, tokens,
                           cache_hits, cache_misses, worker)
VALUES (%(pipeline)s, %(model)s, %(purpose)s, %(cost_center)s, %(requests)s, %(inputs)s,
        %(tokens)s, %(cache_hits)s, %(cache_misses)s, %(worker)s)

-- batched --
-- Keys of bulk statements not yet expanded: a claim that found nothing while another worker
-- was expanding them does not mean the queue is empty.
SELECT pgembed.batched_keys()

-- deferred_ready --
-- HNSW indexes put off for a backfill that is now over (see pgembed.deferred_index_plan).
SELECT pipeline, create_sql, drop_sql FROM pgembed.deferred_index_plan()

-- index_lock --
-- One builder per index in the whole fleet, for as long as its session holds the lock.
SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext('pgembed.index'), pg_catalog.hashtext(%(pipeline)s))

-- index_unlock --
SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtext('pgembed.index'), pg_catalog.hashtext(%(pipeline)s))

-- index_session --
-- A build takes minutes on millions of rows; with the memory it builds the graph in RAM.
SELECT pg_catalog.set_config('maintenance_work_mem', %(memory)s, false),
       pg_catalog.set_config('statement_timeout', '0', false)

-- index_built --
DELETE FROM pgembed.deferred_indexes WHERE pipeline = %(pipeline)s

-- listen --
-- The worker's listener: the outbox triggers and pgembed's functions NOTIFY on this channel.
LISTEN pgembed

-- listener_probe --
-- The listener's proof that its session still hears: a notification to itself, whose
-- payload (listener.PROBE_PREFIX...) every listener knows is not work.
SELECT pg_catalog.pg_notify('pgembed', %(payload)s)

-- heartbeat --
SELECT pgembed.heartbeat(%(name)s, %(host)s, %(pid)s, %(version)s, %(state)s, %(concurrency)s,
                         %(batches)s, %(written)s, %(removed)s, %(failed)s, %(starting)s)

-- worker_exit --
SELECT pgembed.worker_exit(%(name)s)

-- queue_depth --
SELECT ready, leased, waiting FROM pgembed.queue_depth()
