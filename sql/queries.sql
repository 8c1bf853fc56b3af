-- Named queries the worker runs. A block starts with "-- name --"; the loader in
-- pgembed/sqlfiles.py maps names to statements. Parameters are bound, never spliced.

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
SELECT content_hash, embedding FROM pgembed.embedding_cache WHERE content_hash = ANY(%(hashes)s)

-- cache_touch --
-- Marks entries as used, at most once an hour each, so hits stay nearly write-free.
UPDATE pgembed.embedding_cache SET last_used_at = now()
 WHERE content_hash = ANY(%(hashes)s) AND last_used_at < now() - interval '1 hour'

-- cache_put --
-- Sorted by hash so that two workers storing overlapping sets never deadlock.
INSERT INTO pgembed.embedding_cache (content_hash, model, dimensions, embedding, tokens)
SELECT h, %(model)s, %(dimensions)s, e, t
  FROM unnest(%(hashes)s::bytea[], %(embeddings)s::vector[], %(tokens)s::int[]) AS u(h, e, t)
 ORDER BY h
ON CONFLICT (content_hash) DO NOTHING

-- held --
-- The rows of a batch this worker still holds: same lease, lease not expired. Rows an
-- application transaction is changing right now are skipped: they come round again.
SELECT key, version FROM pgembed.outbox
 WHERE pipeline = %(pipeline)s AND lease_id = %(lease)s AND available_at > now()
   AND key = ANY(%(keys)s::jsonb[])
 ORDER BY key
   FOR UPDATE SKIP LOCKED

-- done --
DELETE FROM pgembed.outbox WHERE pipeline = %(pipeline)s AND key = ANY(%(keys)s::jsonb[])

-- clear_failures --
DELETE FROM pgembed.failures WHERE pipeline = %(pipeline)s AND key = ANY(%(keys)s::jsonb[])

-- release --
-- Gives rows back, e.g. changed while they were embedded, or after an API outage.
UPDATE pgembed.outbox
   SET lease_id = NULL, leased_by = NULL,
       available_at = now() + make_interval(secs => %(delay)s)
 WHERE pipeline = %(pipeline)s AND lease_id = %(lease)s AND key = ANY(%(keys)s::jsonb[])

-- fail --
SELECT pgembed.record_failures(%(pipeline)s, %(lease)s, %(keys)s::jsonb[], %(errors)s::text[],
                               %(max_attempts)s, %(retry_base)s)

-- usage --
INSERT INTO pgembed.usage (pipeline, model, purpose, cost_center, requests, inputs, tokens,
                           cache_hits, cache_misses, worker)
VALUES (%(pipeline)s, %(model)s, %(purpose)s, %(cost_center)s, %(requests)s, %(inputs)s,
        %(tokens)s, %(cache_hits)s, %(cache_misses)s, %(worker)s)

-- ready_count --
SELECT count(*) FROM pgembed.outbox WHERE available_at <= now()
