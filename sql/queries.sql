-- Named queries pgembed runs. A block starts with "-- name --"; the loader in
-- pgembed/sqlfiles.py maps names to statements and refuses duplicate names, empty blocks
-- and names it cannot parse. Parameters are bound, never spliced. A {placeholder} in
-- braces is SQL the caller composes with psycopg.sql (a per-pipeline function or table,
-- key columns, a fixed distance operator), never a value.
-- Built-in functions are called as pg_catalog.f(): a lookalike earlier on the worker's
-- search_path (a schema named after its role, say) must not decide what now() is.

-- ===== pgembed/queue.py: the worker's queue =====

-- claim --
-- Lease up to `limit` ready rows of one pipeline (round robin after `after`) of those in
-- `only` (NULL: any).
SELECT pipeline, key, version, purpose, attempts
  FROM pgembed.claim_from(%(worker)s, %(lease)s, %(limit)s, %(lease_seconds)s, %(after)s, %(only)s)

-- pipelines --
SELECT p.name, p.id, p.model, p.dimensions, p.chunk_tokens, p.chunk_overlap,
       m.dimensions AS native_dimensions, m.max_input_tokens, m.max_batch_inputs,
       m.max_batch_tokens, p.chunking, m.tokenizer, p.chunk_prefix IS NOT NULL AS prefixed,
       p.late_chunking
  FROM pgembed.pipelines p
  CROSS JOIN LATERAL pgembed.model_info(p.model) AS m

-- cache_get --
SELECT content_hash, embedding FROM pgembed.embedding_cache WHERE content_hash = ANY(%(hashes)b::bytea[])

-- cache_touch --
-- Marks entries as used, at most once an hour each, so hits stay nearly write-free.
UPDATE pgembed.embedding_cache SET last_used_at = pg_catalog.now()
 WHERE content_hash = ANY(%(hashes)b::bytea[]) AND last_used_at < pg_catalog.now() - interval '1 hour'

-- acknowledge --
-- A batch's acknowledgement, all of it in one statement and one round trip: the new cache
-- entries, the lease and version checks, the store, the outbox and the failures, the usage
-- ledger (see pgembed.acknowledge in sql/outbox.sql). Arrays travel in binary: formatting
-- vectors as text costs more than the write. Returns the positions of the rows that had
-- changed and of those this worker no longer held.
SELECT changed, skipped
  FROM pgembed.acknowledge(%(pipeline)s, %(lease)s, %(keys)s, %(versions)b::bigint[], %(errors)b::text[],
                           %(rows)b::int[], %(seqs)b::int[], %(texts)b::text[], %(doc_hashes)b::bytea[],
                           %(hashes)b::bytea[], %(vectors)b::vector[], %(truncated)b::boolean[], %(cache_at)b::int[],
                           %(cache_tokens)b::int[], %(model)s, %(dimensions)s, %(usage)s, %(worker)s,
                           %(max_attempts)s, %(retry_base)s)

-- release_unlocked --
-- Gives back rows of a batch that pgembed.acknowledge skipped because someone held their
-- row lock at that instant (an application statement changing them: they need embedding again). Without
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

-- statement_keys --
-- Keys of statements not yet expanded: a claim that found nothing while another worker
-- was expanding them does not mean the queue is empty.
SELECT pgembed.statement_keys()

-- statement_keys_of --
-- The same, of the pipelines a worker serves.
SELECT coalesce(sum(pgembed.statement_keys(p)), 0) FROM pg_catalog.unnest(%(only)s::text[]) AS p

-- backlog_of --
-- Rows waiting in the outbox (in any state) and in unexpanded statements, per pipeline.
SELECT p, (SELECT count(*) FROM pgembed.outbox o WHERE o.pipeline = p) + pgembed.statement_keys(p)
  FROM pg_catalog.unnest(%(pipelines)s::text[]) AS p

-- leased_elsewhere --
-- Rows of the pipelines a worker serves that other workers hold now (in flight): a drain
-- that found nothing to claim waits for them rather than call the queue empty. With who
-- holds them, for the message when the wait runs out. Rows out in a provider batch
-- (pgembed/batch_api/) are no worker's to wait for: they come back when it is collected.
SELECT count(*), coalesce(pg_catalog.string_agg(DISTINCT coalesce(leased_by, '?'), ', '), '')
  FROM pgembed.outbox
 WHERE pipeline = ANY(%(only)s::text[]) AND lease_id IS NOT NULL
   AND available_at > pg_catalog.now() AND leased_by IS DISTINCT FROM %(worker)s
   AND NOT pg_catalog.starts_with(leased_by, 'batch-api:')

-- pipeline_exists --
-- Whether a pipeline a batch was claimed for still exists (same name, same id).
SELECT 1 FROM pgembed.pipelines WHERE name = %(name)s AND id = %(id)s

-- read_rows --
-- Current content of claimed rows, through the pipeline's reader: {function} is
-- pgembed.p<id>_read, composed as an identifier.
SELECT key, found, content, cost_center FROM {function}(%(keys)s)

-- ===== pgembed/indexes.py: deferred HNSW index builds =====

-- deferred_ready --
-- Deferred indexes that can be built now: HNSW after its backfill, IVFFlat once it has rows
-- to train on (see pgembed.deferred_index_plan).
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
-- The deferred row goes; an IVFFlat index is recorded with its lists (pgembed.index_builds).
SELECT pgembed.deferred_index_built(%(pipeline)s, %(worker)s)

-- ===== pgembed/costs.py: the cost views and the dead-letter table, for the CLI =====

-- cost_spend_by_purpose --
-- Usage and spend over the last `days` calendar days, per pipeline × model × purpose.
SELECT pipeline, model, purpose,
       sum(requests)::bigint AS requests, sum(inputs)::bigint AS inputs,
       sum(tokens)::bigint AS tokens, sum(cache_hits)::bigint AS cache_hits,
       sum(cache_misses)::bigint AS cache_misses, sum(usd) AS usd
  FROM pgembed.cost_daily
 WHERE day > current_date - %(days)s::int
 GROUP BY pipeline, model, purpose
 ORDER BY usd DESC, tokens DESC, pipeline, model, purpose

-- cost_spend_by_cost_center --
-- The same, per cost center × pipeline × purpose.
SELECT cost_center, pipeline, purpose,
       sum(requests)::bigint AS requests, sum(inputs)::bigint AS inputs,
       sum(tokens)::bigint AS tokens, sum(cache_hits)::bigint AS cache_hits,
       sum(cache_misses)::bigint AS cache_misses, sum(usd) AS usd
  FROM pgembed.cost_by_cost_center
 WHERE day > current_date - %(days)s::int
 GROUP BY cost_center, pipeline, purpose
 ORDER BY usd DESC, tokens DESC, cost_center, pipeline, purpose

-- cost_spend_by_label --
-- The same, per application user, task or source (pgembed.cost_by_attribution): the
-- biggest spenders first, the first `top` of them (NULL: all).
SELECT CASE %(by)s::text WHEN 'user' THEN app_user WHEN 'task' THEN task WHEN 'source' THEN source END
           AS label,
       sum(requests)::bigint AS requests, sum(inputs)::bigint AS inputs,
       sum(tokens)::bigint AS tokens, sum(cache_hits)::bigint AS cache_hits,
       sum(cache_misses)::bigint AS cache_misses, sum(usd) AS usd
  FROM pgembed.cost_by_attribution
 WHERE day > current_date - %(days)s::int
 GROUP BY 1
 ORDER BY usd DESC, tokens DESC, label NULLS LAST
 LIMIT %(top)s::int

-- cost_share --
-- Indexing versus queries, per day of the last `days` calendar days.
SELECT day, work, requests, tokens, usd, token_share, usd_share
  FROM pgembed.cost_share_daily
 WHERE day > current_date - %(days)s::int
 ORDER BY day, work

-- cost_anomalies --
SELECT * FROM pgembed.cost_anomalies

-- cost_source_anomalies --
SELECT * FROM pgembed.cost_source_anomalies

-- cache_stats --
SELECT * FROM pgembed.cache_stats ORDER BY usd_saved DESC, model

-- failures_list --
-- Rows that could not be embedded (of all pipelines when no pipeline is given; of all classes
-- when no class is), parked ones first, newest failure first.
SELECT pipeline, key, class, error, attempts, first_failed_at, last_failed_at, parked_at
  FROM pgembed.failures
 WHERE (%(pipeline)s::text IS NULL OR pipeline = %(pipeline)s)
   AND (%(class)s::text IS NULL OR class = %(class)s)
 ORDER BY parked_at IS NULL, last_failed_at DESC, pipeline, key

-- failure_classes --
SELECT class, park_after, auto_retry, description FROM pgembed.failure_classes ORDER BY class

-- failures_retry --
SELECT pgembed.retry_failures(%(pipeline)s, class => %(class)s)

-- ===== pgembed/pipelines.py: pipeline administration =====

-- pipeline_create --
SELECT pgembed.create_pipeline(source => %(source)s::regclass, content => %(content)s,
                               model => %(model)s, dimensions => %(dimensions)s,
                               index => %(index)s, index_options => %(index_options)s::jsonb,
                               distance => %(distance)s, chunk_tokens => %(chunk_tokens)s,
                               chunk_overlap => %(chunk_overlap)s, backfill => %(backfill)s,
                               cost_center => %(cost_center)s, name => %(name)s,
                               chunking => %(chunking)s, chunk_prefix => %(chunk_prefix)s,
                               storage => %(storage)s, quantization => %(quantization)s,
                               rerank => %(rerank)s, late_chunking => %(late_chunking)s)

-- pipeline_same --
-- pipelines that already embed this content of this table with this model (at these
-- dimensions, when given): `pgembed pipeline create` refuses to make another unasked
SELECT name FROM pgembed.pipelines
 WHERE source = %(source)s::regclass AND content = %(content)s AND model = %(model)s
   AND dimensions = coalesce(%(dimensions)s::int, dimensions)
 ORDER BY name

-- pipeline_drop --
SELECT pgembed.drop_pipeline(%(name)s)

-- pipeline_list --
SELECT name, source::text AS source, content, model, dimensions, index_type, distance,
       chunking, chunk_tokens, storage, quantization,
       (SELECT count(*) FROM pgembed.outbox o WHERE o.pipeline = p.name)
       + pgembed.statement_keys(p.name) AS queued
  FROM pgembed.pipelines p
 ORDER BY name

-- pipeline_get --
SELECT name, destination, distance, key_columns, model, dimensions, index_type
  FROM pgembed.pipelines WHERE name = %(name)s

-- ===== pgembed/progress.py: the backlog a drain reports against =====

-- backlog --
SELECT (SELECT count(*) FROM pgembed.outbox) + pgembed.statement_keys()

-- ===== pgembed/search.py: nearest-neighbour search =====

-- model_info --
SELECT dimensions, max_input_tokens, max_batch_inputs, max_batch_tokens
  FROM pgembed.model_info(%(model)s)

-- query_cache_get --
SELECT embedding FROM pgembed.embedding_cache WHERE content_hash = %(hash)s

-- query_cache_put --
INSERT INTO pgembed.embedding_cache (content_hash, model, dimensions, embedding, tokens)
VALUES (%(hash)s, %(model)s, %(dimensions)s, %(embedding)s, %(tokens)s)
ON CONFLICT DO NOTHING

-- query_usage --
-- A query embedding (or a gateway call): its purpose and labels are the caller's
-- (pgembed/attribution.py).
INSERT INTO pgembed.usage (pipeline, model, purpose, cost_center, requests, inputs, tokens,
                           cache_hits, cache_misses, source, app_user, task)
VALUES (%(pipeline)s, %(model)s, %(purpose)s, %(cost_center)s, %(requests)s, %(inputs)s,
        %(tokens)s, %(cache_hits)s, %(cache_misses)s, %(source)s, %(app_user)s, %(task)s)

-- search --
-- The k rows nearest to a query vector, one per row (its best chunk): see sql/search.sql.
SELECT key, chunk_seq, chunk, distance
  FROM pgembed.search(%(pipeline)s, %(vector)s::real[], %(k)s, %(filter)s::jsonb)

-- ===== pgembed/evaluation/beir.py: a pipeline's quality on a BEIR corpus =====

-- evaluation_table --
-- {table} is the corpus table's name, composed as an identifier.
CREATE TABLE {table} (id text PRIMARY KEY, title text NOT NULL, body text NOT NULL)

-- evaluation_copy --
COPY {table} (id, title, body) FROM STDIN

-- evaluation_pipeline --
-- Default options: the chunking and the HNSW index a user gets without asking.
SELECT pgembed.create_pipeline(%(table)s::regclass, 'title || '' '' || body', %(model)s)

-- evaluation_failures --
SELECT count(*) FROM pgembed.failures WHERE pipeline = %(pipeline)s

-- evaluation_chunks --
-- {destination} is the pipeline's table in schema pgembed.
SELECT id, chunk FROM pgembed.{destination} ORDER BY id, chunk_seq

-- ===== pgembed/aliases.py: stable search names =====

-- resolve_pipeline --
SELECT pgembed.resolve_pipeline(%(name)s)

-- pipeline_resolved --
-- pipeline_get's columns, of the pipeline a name (an alias, or a pipeline's) stands for.
SELECT name, destination, distance, key_columns, model, dimensions, index_type
  FROM pgembed.pipelines WHERE name = pgembed.resolve_pipeline(%(name)s)

-- alias_set --
SELECT pgembed.set_alias(%(alias)s, %(pipeline)s)

-- alias_drop --
SELECT pgembed.drop_alias(%(alias)s)

-- alias_evaluation --
SELECT pgembed.set_alias_evaluation(%(alias)s, %(eval_set)s, %(every)s, %(threshold)s)

-- alias_list --
SELECT a.name, a.pipeline, a.previous, a.eval_set, a.eval_every, a.regression_threshold,
       a.changed_at, a.changed_by
  FROM pgembed.aliases a ORDER BY a.name

-- ===== pgembed/evaluation/sets.py and runs.py: evaluation sets and runs =====

-- eval_import --
SELECT pgembed.import_eval_set(%(name)s, %(source)s::regclass, %(origin)s, %(queries)s, %(judgments)s,
                               %(replace)s)

-- eval_drop --
DELETE FROM pgembed.eval_sets WHERE name = %(name)s RETURNING name

-- eval_set_list --
SELECT name, source, origin, queries, relevant, irrelevant, imported_at
  FROM pgembed.eval_set_summary ORDER BY name

-- eval_queries --
SELECT query_id, query FROM pgembed.eval_queries WHERE eval_set = %(eval_set)s ORDER BY query_id

-- eval_judgments --
SELECT query_id, key, relevance FROM pgembed.eval_judgments WHERE eval_set = %(eval_set)s

-- eval_usage_mark --
-- The last usage row so far: the run's query embeddings are the rows after it.
SELECT coalesce(pg_catalog.max(id), 0) FROM pgembed.usage

-- eval_usage_tokens --
SELECT coalesce(pg_catalog.sum(tokens), 0) FROM pgembed.usage
 WHERE id > %(mark)s AND purpose = 'query' AND pipeline = %(pipeline)s AND cost_center = %(cost_center)s

-- eval_run_insert --
INSERT INTO pgembed.eval_runs (target, pipeline, model, eval_set, metrics, ks, queries, query_tokens,
                               cost_center, seconds, scheduled)
VALUES (%(target)s, %(pipeline)s, %(model)s, %(eval_set)s, %(metrics)s, %(ks)s, %(queries)s,
        %(query_tokens)s, %(cost_center)s, %(seconds)s, %(scheduled)s)
RETURNING id

-- eval_latest --
SELECT id, target, pipeline, model, eval_set, metrics FROM pgembed.eval_runs
 WHERE pipeline = %(pipeline)s AND eval_set = %(eval_set)s ORDER BY at DESC, id DESC LIMIT 1

-- eval_history --
SELECT id, at, target, pipeline, model, eval_set, ndcg_10, recall_10, mrr_10, ndcg_10_change,
       queries, query_tokens, query_usd, scheduled
  FROM pgembed.eval_history
 WHERE (%(eval_set)s::text IS NULL OR eval_set = %(eval_set)s)
   AND (%(target)s::text IS NULL OR target = %(target)s OR pipeline = %(target)s)
 ORDER BY at, id

-- eval_regressions --
SELECT id, at, target, pipeline, model, eval_set, ndcg_10, previous_ndcg_10, ndcg_10_change, threshold
  FROM pgembed.eval_regressions ORDER BY at, id

-- eval_due --
-- The aliases whose evaluation set is due: none of its runs on the alias within its period.
SELECT a.name, a.eval_set FROM pgembed.aliases a
 WHERE a.eval_set IS NOT NULL AND a.eval_every IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM pgembed.eval_runs r
                    WHERE r.target = a.name AND r.eval_set = a.eval_set
                      AND r.at > pg_catalog.now() - a.eval_every)
 ORDER BY a.name

-- ===== pgembed/quickstart.py: the sample corpus =====

-- sample_table --
CREATE TABLE IF NOT EXISTS pgembed_sample_articles (
    id int PRIMARY KEY,
    title text NOT NULL,
    body text NOT NULL
)

-- sample_insert --
INSERT INTO pgembed_sample_articles (id, title, body) VALUES (%(id)s, %(title)s, %(body)s)
ON CONFLICT (id) DO NOTHING

-- ===== pgembed/audit.py: consistency audit and pipeline health =====

-- audit_run --
SELECT * FROM pgembed.audit(p_repair => %(repair)s, p_pipeline => %(pipeline)s)

-- pipeline_status --
SELECT * FROM pgembed.pipeline_status
 WHERE %(pipeline)s::text IS NULL OR pipeline = %(pipeline)s
 ORDER BY pipeline

-- gaps --
SELECT pipeline, key, kind, since FROM pgembed.gaps(%(pipeline)s)
 ORDER BY since, pipeline, kind, key
 LIMIT %(limit)s

-- ===== pgembed/migrate.py: the schema revision a database is at =====

-- has_versions --
-- The alembic version table (migrate.VERSION_TABLE) exists.
SELECT pg_catalog.to_regclass('public.pgembed_alembic_version') IS NOT NULL

-- revision --
SELECT version_num FROM public.pgembed_alembic_version

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

-- release_dead_workers --
SELECT worker, rows FROM pgembed.release_dead_workers(%(dead_after)s, %(worker)s)

-- worker_exit --
SELECT pgembed.worker_exit(%(name)s)

-- queue_depth --
SELECT ready, leased, waiting FROM pgembed.queue_depth()

-- ===== pgembed/ratelimit.py: shared rate limit budgets =====

-- rate_limit_take --
-- The grant (0: granted, else seconds to wait) and, in the same round trip, whether the
-- bucket has a budget at all (false: the limiter stops asking for a while). First, what
-- the API's rate-limit headers said since the last grant (all NULL: nothing to learn): a
-- subquery with a volatile function is run before the query above it.
SELECT pgembed.take_budget(%(bucket)s, %(requests)s, %(tokens)s),
       EXISTS (SELECT FROM pgembed.rate_limits
                WHERE bucket = %(bucket)s
                  AND (max_requests IS NOT NULL OR max_tokens IS NOT NULL))
  FROM (SELECT pgembed.learn_rate_limit(%(bucket)s, %(requests_limit)s, %(requests_remaining)s,
                                        %(requests_reset)s, %(tokens_limit)s, %(tokens_remaining)s,
                                        %(tokens_reset)s)) AS learnt

-- rate_limit_take_bulk --
-- The same for a bulk request: within the bulk lane's share first (pgembed.take_bulk_budget).
SELECT pgembed.take_bulk_budget(%(bucket)s, %(requests)s, %(tokens)s),
       EXISTS (SELECT FROM pgembed.rate_limits
                WHERE bucket = %(bucket)s
                  AND (max_requests IS NOT NULL OR max_tokens IS NOT NULL))
  FROM (SELECT pgembed.learn_rate_limit(%(bucket)s, %(requests_limit)s, %(requests_remaining)s,
                                        %(requests_reset)s, %(tokens_limit)s, %(tokens_remaining)s,
                                        %(tokens_reset)s)) AS learnt

-- rate_limit_is_limited --
-- Only reads (no row lock), so it is safe inside the caller's transaction.
SELECT EXISTS (SELECT FROM pgembed.rate_limits
                WHERE bucket = %(bucket)s
                  AND (max_requests IS NOT NULL OR max_tokens IS NOT NULL))

-- rate_limit_set --
SELECT bucket FROM pgembed.set_rate_limit(%(bucket)s, %(max_requests)s, %(max_tokens)s,
                                          %(per_seconds)s, %(burst_seconds)s, %(base_url)s,
                                          %(key_fingerprint)s, %(headroom)s)

-- rate_limit_clear --
DELETE FROM pgembed.rate_limits WHERE bucket = %(bucket)s

-- rate_limit_status --
SELECT * FROM pgembed.rate_limit_status ORDER BY bucket

-- ===== pgembed/scheduler.py: the periodic jobs and their bookkeeping =====

-- job_lock --
-- The job's advisory lock: two runs of one job never overlap, even one outlasting its period.
SELECT pgembed.try_job_lock(%(job)s)

-- job_unlock --
SELECT pgembed.job_unlock(%(job)s)

-- job_run_start --
-- Claims the current period of the job in pgembed.job_runs; NULL when it already ran.
SELECT pgembed.start_job_run(%(job)s, %(worker)s, %(every)s)

-- job_run_finish --
SELECT pgembed.finish_job_run(%(run_id)s, %(ok)s, %(detail)s)

-- schedule_upsert --
SELECT pgembed.upsert_schedule(%(job)s, %(every)s, %(next_run)s, %(settings)s, %(worker)s)

-- schedule_delete --
-- A job disabled in this worker's configuration is no longer shown as scheduled.
DELETE FROM pgembed.schedules WHERE job = %(job)s

-- job_audit --
SELECT pgembed.run_scheduled_audit(%(repair)s)

-- job_clean_cache --
-- One slice of cache entries (the caller asks for 10,000 at a time and loops), each its
-- own short statement, so a large clean-up never holds one long transaction.
SELECT pgembed.clean_cache(%(max_age)s, %(slice)s)

-- job_prune --
SELECT job_runs, workers FROM pgembed.prune_service_rows()

-- job_retry_parked --
SELECT pgembed.retry_parked_failures(%(parked_after)s, %(parked_max)s)

-- ivfflat_plan --
-- One row per IVFFlat pipeline: what to do now. create_sql and drop_sql are statements
-- the database composed (identifiers quoted by format()), which the index job then runs as given.
SELECT pipeline, row_count, built_rows, built_lists, lists, action, index_name, create_sql,
       drop_sql
  FROM pgembed.ivfflat_plan(%(min_rows)s, %(rebuild_factor)s)

-- ivfflat_record_build --
SELECT pgembed.record_index_build(%(pipeline)s, %(index_name)s, %(lists)s, %(row_count)s, %(worker)s)

-- ===== pgembed/orm.py: a pipeline's tables for SQLAlchemy =====

-- orm_pipeline --
-- Where a pipeline's rows live, for reflection: the source's schema and name apart (not
-- the regclass text, whose quoting depends on the search_path), the destination, the key.
SELECT n.nspname AS source_schema, c.relname AS source_table, p.destination, p.key_columns, p.distance
  FROM pgembed.pipelines p
  JOIN pg_catalog.pg_class c ON c.oid = p.source
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE p.name = %(name)s

-- migration_target --
-- What a migration of an alias to a model would build (checked: sql/model_migrations.sql).
SELECT * FROM pgembed.migration_target(%(alias)s, %(model)s, %(dimensions)s::int)

-- backfill_target --
-- What create_pipeline with these arguments would backfill (its dry run).
SELECT * FROM pgembed.backfill_target(%(source)s::regclass, %(content)s, %(model)s, %(dimensions)s::int,
                                      %(chunking)s, %(chunk_tokens)s::int, %(chunk_overlap)s::int,
                                      %(chunk_prefix)s)

-- pin_settings --
-- A dry run reads content as the reader renders it: pgembed.pinned_setting_values(), for
-- this transaction.
SELECT pg_catalog.count(pg_catalog.set_config(v.name, v.setting, true)) FROM pgembed.pinned_setting_values() AS v

-- cache_has --
SELECT content_hash FROM pgembed.embedding_cache WHERE content_hash = ANY(%(hashes)s::bytea[])

-- rate_limit_of --
SELECT max_requests, max_tokens, per_seconds FROM pgembed.rate_limits WHERE bucket = %(bucket)s

-- migration_start --
SELECT pgembed.start_migration(%(alias)s, %(model)s, %(dimensions)s::int, %(estimate)s, %(name)s,
                               %(max_drop)s::numeric, %(window)s::interval)

-- migration_status --
SELECT * FROM pgembed.model_migration_status
 WHERE %(alias)s::text IS NULL OR alias = %(alias)s
 ORDER BY id DESC

-- migration_open --
-- The alias's migration not yet cleaned up, else its latest (pgembed.alias_migration).
SELECT m.id, m.from_pipeline, m.to_pipeline, m.phase, m.eval_set, a.eval_set AS alias_eval_set
  FROM pgembed.alias_migration(%(alias)s) AS m CROSS JOIN pgembed.aliases a
 WHERE a.name = %(alias)s

-- migration_evaluated --
SELECT pgembed.migration_evaluated(%(alias)s, %(eval_set)s, %(active_run)s, %(shadow_run)s)

-- migration_cutover --
SELECT pgembed.cutover_migration(%(alias)s, %(force)s, %(reason)s)

-- migration_rollback --
SELECT pgembed.rollback_migration(%(alias)s)

-- migration_cleanup --
SELECT pgembed.cleanup_migration(%(alias)s)

-- migration_events --
SELECT e.at, e.event, e.by_user, e.detail FROM pgembed.model_migration_events e
 WHERE e.migration = %(migration)s ORDER BY e.id

-- job_clean_migrations --
SELECT pgembed.cleanup_due_migrations()

-- ===== pgembed/aio.py: the in-process client and the gateway (batched query embeddings) =====

-- batch_cache_get --
-- The cached vectors of one batch's texts, in one round trip (misses are simply absent).
SELECT content_hash, embedding FROM pgembed.embedding_cache WHERE content_hash = ANY(%(hashes)s::bytea[])

-- ===== pgembed/writethrough.py: embedding named keys at once =====

-- writethrough_target --
-- The pipeline a name stands for (pgembed.resolve_pipeline raises for an unknown name) and
-- how many columns its key has.
SELECT p.name, pg_catalog.cardinality(p.key_columns) FROM pgembed.pipelines p
 WHERE p.name = pgembed.resolve_pipeline(%(target)s)

-- writethrough_claim --
-- Lease exactly these keys of one pipeline (pgembed.claim_keys): one row per key asked for.
SELECT key, state, version, purpose, attempts, holder, error
  FROM pgembed.claim_keys(%(pipeline)s, %(worker)s, %(lease)s, %(keys)s, %(lease_seconds)s)

-- ===== pgembed/batch_api/: the provider's Batch API =====

-- batch_api_backlog --
-- Bulk rows of a pipeline ready now: what a batch could take.
SELECT count(*) FROM pgembed.outbox
 WHERE pipeline = %(pipeline)s AND available_at <= pg_catalog.now() AND purpose NOT IN ('sync', 'retry')

-- batch_api_claim --
SELECT batch, lease, claimed FROM pgembed.batch_api_claim(%(pipeline)s, %(limit)s, %(lease_seconds)s)

-- batch_api_rows --
SELECT key, version, purpose, attempts FROM pgembed.provider_batch_rows WHERE batch = %(batch)s ORDER BY key

-- batch_api_add_line --
INSERT INTO pgembed.provider_batch_lines (batch, line, purpose, cost_center, hashes)
VALUES (%(batch)s, %(line)s, %(purpose)s, %(cost_center)s, %(hashes)s::bytea[])

-- batch_api_submitted --
SELECT pgembed.batch_api_submitted(%(batch)s, %(provider_id)s, %(input_file)s, %(lines)s, %(inputs)s)

-- batch_api_open --
-- Batches not finished, oldest first (of one pipeline, or all when NULL), and their age.
SELECT id, pipeline, state, provider_id, lease,
       pg_catalog.date_part('epoch', pg_catalog.now() - created_at)::float8
  FROM pgembed.provider_batches
 WHERE state IN ('preparing', 'submitted') AND (%(pipeline)s::text IS NULL OR pipeline = %(pipeline)s)
 ORDER BY id

-- batch_api_checked --
UPDATE pgembed.provider_batches SET provider_status = %(status)s, checked_at = pg_catalog.now()
 WHERE id = %(batch)s

-- batch_api_release_changed --
SELECT pgembed.batch_api_release_changed(%(batch)s)

-- batch_api_lines --
SELECT line, purpose, cost_center, hashes FROM pgembed.provider_batch_lines WHERE batch = %(batch)s

-- batch_api_cache_put --
-- A batch's vectors into the cache, as an acknowledgement puts a worker's: sorted by hash,
-- an entry already there kept.
INSERT INTO pgembed.embedding_cache (content_hash, model, dimensions, embedding, tokens)
SELECT e.hash, %(model)s, %(dimensions)s, e.embedding, e.tokens
  FROM unnest(%(hashes)s::bytea[], %(vectors)s, %(tokens)s::int[]) AS e(hash, embedding, tokens)
 ORDER BY e.hash
ON CONFLICT (content_hash) DO NOTHING

-- batch_api_finish --
SELECT finished, requeued
  FROM pgembed.batch_api_finish(%(batch)s, %(state)s, %(provider_status)s, %(usage)s, %(price_factor)s,
                                %(stored)s)

-- batch_api_status --
SELECT id, pipeline, state, provider_status, rows, lines, inputs, held, stored, requeued,
       created_at, finished_at
  FROM pgembed.provider_batch_status
 WHERE %(pipeline)s::text IS NULL OR pipeline = %(pipeline)s
 ORDER BY id

-- batch_api_analyze --
-- After a batch leases (or before it gives back) thousands of rows: their lease expiry in the
-- future is new to the planner, which would otherwise read every leased row through
-- outbox_claim in each acknowledgement of the pipeline (the batch's and the workers') instead
-- of looking the keys up. A role that does not own the table gets a warning, not an error.
ANALYZE pgembed.outbox
