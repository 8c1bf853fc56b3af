-- pgembed comments: what `\d+ pgembed.<table>` says about each table and its columns.
-- Re-applied by every upgrade, so a better sentence needs no migration revision.

COMMENT ON SCHEMA pgembed IS 'pgembed: embeddings of ordinary rows, kept in step by triggers, an outbox and workers';

COMMENT ON TABLE pgembed.models IS 'Embedding models: dimensions, API limits, price. INSERT a row to register an OpenAI-compatible model; hash:N needs none';
COMMENT ON COLUMN pgembed.models.shortenable IS 'true when the model can return fewer dimensions (Matryoshka)';
COMMENT ON COLUMN pgembed.models.max_input_tokens IS 'longest input the model takes, in its own tokens';
COMMENT ON COLUMN pgembed.models.max_batch_inputs IS 'most inputs in one embedding request';
COMMENT ON COLUMN pgembed.models.max_batch_tokens IS 'most tokens in one embedding request';
COMMENT ON COLUMN pgembed.models.usd_per_1m_tokens IS 'price; the cost views read it, so an edit applies to past usage too';
COMMENT ON COLUMN pgembed.models.short_name IS 'used in destination table names';
COMMENT ON COLUMN pgembed.models.tokenizer IS 'how chunks are counted: cl100k, model (a local model''s own), NULL (cl100k, a quarter of the window kept free)';

COMMENT ON TABLE pgembed.pipelines IS 'One row per pipeline: a source table, a content expression, a model, a destination table';
COMMENT ON COLUMN pgembed.pipelines.content IS 'the content expression as the creator wrote it';
COMMENT ON COLUMN pgembed.pipelines.content_columns IS 'columns the content reads: an UPDATE queues a row only if one of them changed';
COMMENT ON COLUMN pgembed.pipelines.content_bound IS 'content with every name bound (deparsed on search_path pg_catalog): what workers and the audit evaluate';
COMMENT ON COLUMN pgembed.pipelines.content_functions IS 'functions the content calls (regprocedure)';
COMMENT ON COLUMN pgembed.pipelines.cost_center IS 'expression naming who pays for a row''s embedding, or NULL';
COMMENT ON COLUMN pgembed.pipelines.cost_center_bound IS 'cost_center bound like content_bound';
COMMENT ON COLUMN pgembed.pipelines.destination IS 'table pgembed.<destination> holds the vectors: key columns, chunk_seq, chunk, hashes, embedding';
COMMENT ON COLUMN pgembed.pipelines.key_columns IS 'the source''s primary key columns, in key order';
COMMENT ON COLUMN pgembed.pipelines.key_types IS 'their SQL types';
COMMENT ON COLUMN pgembed.pipelines.chunk_tokens IS '0: no chunking; else tokens per chunk, in the model''s tokens (cl100k for chunking tokens)';
COMMENT ON COLUMN pgembed.pipelines.chunking IS 'recursive, markdown, tokens (cl100k windows), truncate (start only, flagged) or none (too long fails)';
COMMENT ON COLUMN pgembed.pipelines.chunk_prefix IS 'expression embedded at the head of every chunk of a row, as given (content_bound carries it)';
COMMENT ON COLUMN pgembed.pipelines.storage IS 'vector (4-byte floats, indexed up to 2,000 dimensions) or halfvec (2-byte floats, up to 4,000)';
COMMENT ON COLUMN pgembed.pipelines.quantization IS 'none, or binary: the HNSW index holds binary_quantize(embedding), searches re-rank by the stored vectors';
COMMENT ON COLUMN pgembed.pipelines.rerank IS 'a binary-quantized search reads rerank times as many candidates as it returns';
COMMENT ON COLUMN pgembed.pipelines.late_chunking IS 'each chunk''s vector pools its own tokens of one run of the model over the whole document (local models)';
COMMENT ON COLUMN pgembed.pipelines.search_path IS 'the creator''s search_path, on which content and cost_center were read';

COMMENT ON TABLE pgembed.outbox IS 'Keys to embed, one row per (pipeline, key); see pgembed.outbox_state for the states of a row';
COMMENT ON COLUMN pgembed.outbox.key IS 'primary key values as a jsonb array of text';
COMMENT ON COLUMN pgembed.outbox.version IS 'bumped by every change; an acknowledgement removes the row only if the version it embedded is still current';
COMMENT ON COLUMN pgembed.outbox.purpose IS 'why it was queued: sync (a change), backfill, repair, retry, migration';
COMMENT ON COLUMN pgembed.outbox.queued_at IS 'when the key was first queued';
COMMENT ON COLUMN pgembed.outbox.changed_at IS 'when the key last changed';
COMMENT ON COLUMN pgembed.outbox.available_at IS 'claimable from then on: a lease''s expiry while leased, the end of a backoff while retrying';
COMMENT ON COLUMN pgembed.outbox.attempts IS 'failures since the last change';
COMMENT ON COLUMN pgembed.outbox.lease_id IS 'the claim that holds the row (with leased_by), NULL when not leased';
COMMENT ON COLUMN pgembed.outbox.leased_by IS 'name of the worker holding the lease (pgembed.workers.name)';

COMMENT ON TABLE pgembed.outbox_statements IS 'Keys of one application statement that queued many rows, expanded into the outbox by a worker''s claim';
COMMENT ON COLUMN pgembed.outbox_statements.keys IS 'the keys, as text (one-column primary keys only)';
COMMENT ON COLUMN pgembed.outbox_statements.expanded IS 'keys[1:expanded] are in the outbox already';

COMMENT ON TABLE pgembed.failure_classes IS 'The kinds of failure and the retry policy of each: attempts before parking, whether the scheduled job retries parked rows';
COMMENT ON COLUMN pgembed.failure_classes.park_after IS 'attempts before a row is parked; NULL: the worker''s --max-attempts';
COMMENT ON COLUMN pgembed.failure_classes.auto_retry IS 'whether the scheduled retry job re-queues parked rows of this class by itself';
COMMENT ON TABLE pgembed.failures IS 'Rows that could not be embedded: retried with backoff, parked (parked_at set) after as many attempts as their class allows';
COMMENT ON COLUMN pgembed.failures.class IS 'what kind of failure (pgembed.failure_classes), from its message (pgembed.failure_class)';
COMMENT ON COLUMN pgembed.failures.parked_at IS 'set once the row left the queue; pgembed failures --retry queues it again';

COMMENT ON TABLE pgembed.embedding_cache IS 'Embeddings by content hash (sha256 of model, dimensions, text): one row serves every pipeline that embeds the same text';
COMMENT ON COLUMN pgembed.embedding_cache.last_used_at IS 'updated at most hourly on a hit; the clean-up job deletes entries unused for long';

COMMENT ON TABLE pgembed.usage IS 'One row per batch a worker finished or query embedded: requests, tokens, cache hits; spend is computed in the cost views';
COMMENT ON COLUMN pgembed.usage.source IS 'the caller''s use (user_query, note_index, reindex...), from the gateway''s X-Pgembed-Source header or the caller; NULL: not said';
COMMENT ON COLUMN pgembed.usage.app_user IS 'the application''s user: the OpenAI user field or X-Pgembed-User; NULL: not said';
COMMENT ON COLUMN pgembed.usage.task IS 'what the user was doing (X-Pgembed-Task); NULL: not said';
COMMENT ON COLUMN pgembed.usage.price_factor IS 'share of the model''s list price billed: 1, or a provider discount (0.5: the Batch API)';

COMMENT ON TABLE pgembed.audit_runs IS 'One row per consistency audit: the gaps it found (before any repair) and what it repaired';
COMMENT ON TABLE pgembed.audit_findings IS 'What each audit run found per pipeline; pipeline_status reads the latest';
COMMENT ON COLUMN pgembed.audit_findings.empty IS 'live rows whose content is NULL or blank: nothing to embed, not a gap';

COMMENT ON TABLE pgembed.workers IS 'Workers, upserted by their heartbeat; state dead: its heartbeat stopped, its leases were given back (kept a day); pg_stat_activity.application_name is pgembed-<role>[<name>]';
COMMENT ON TABLE pgembed.schedules IS 'Periodic jobs the workers run, and when each runs next';
COMMENT ON TABLE pgembed.job_runs IS 'One row per run of a periodic job; finished_at NULL with an old started_at: interrupted';
COMMENT ON TABLE pgembed.index_builds IS 'IVFFlat indexes a worker trained: rows and lists at the time';
COMMENT ON TABLE pgembed.deferred_indexes IS 'HNSW indexes put off until a large backfill is embedded';
COMMENT ON TABLE pgembed.rate_limits IS 'Request and token budgets per API key (bucket), shared by every worker';
COMMENT ON TABLE pgembed.rate_limit_state IS 'The moving part of each limited bucket (sliding window and pacer)';
COMMENT ON COLUMN pgembed.rate_limits.headroom IS 'share of the budget spent (0.9: throttle at 90 %); the rest is a margin';
COMMENT ON COLUMN pgembed.rate_limit_state.api_requests_limit IS 'the request limit the provider''s x-ratelimit-limit-requests header said last';
COMMENT ON COLUMN pgembed.rate_limit_state.api_requests_remaining IS 'requests the provider said remained (x-ratelimit-remaining-requests), when api_seen_at';
COMMENT ON COLUMN pgembed.rate_limit_state.api_requests_reset_at IS 'when that many reset (epoch seconds, from x-ratelimit-reset-requests); past: nothing learnt holds';
COMMENT ON COLUMN pgembed.rate_limit_state.api_requests_granted IS 'requests granted since the provider said what remained';
COMMENT ON COLUMN pgembed.rate_limit_state.api_tokens_limit IS 'the token limit the provider''s x-ratelimit-limit-tokens header said last';
COMMENT ON COLUMN pgembed.rate_limit_state.api_tokens_remaining IS 'tokens the provider said remained (x-ratelimit-remaining-tokens), when api_seen_at';
COMMENT ON COLUMN pgembed.rate_limit_state.api_tokens_reset_at IS 'when that many reset (epoch seconds, from x-ratelimit-reset-tokens); past: nothing learnt holds';
COMMENT ON COLUMN pgembed.rate_limit_state.api_tokens_granted IS 'tokens granted since the provider said what remained';
COMMENT ON COLUMN pgembed.rate_limit_state.api_seen_at IS 'when the provider''s rate-limit headers were last learnt';

-- Stable search names and evaluation
COMMENT ON TABLE pgembed.aliases IS 'Names applications search through; each points at one pipeline (pgembed.set_alias repoints it)';
COMMENT ON COLUMN pgembed.aliases.previous IS 'the pipeline it pointed at before its last repoint (what a rollback returns to)';
COMMENT ON COLUMN pgembed.aliases.eval_set IS 'the evaluation set the scheduler re-runs on this alias (NULL: none)';
COMMENT ON COLUMN pgembed.aliases.eval_every IS 'how often the scheduler re-runs eval_set (NULL: never)';
COMMENT ON COLUMN pgembed.aliases.regression_threshold IS 'a drop in nDCG@10 beyond this, run to run, is listed in eval_regressions';
COMMENT ON TABLE pgembed.eval_sets IS 'Evaluation sets: queries with judged rows of one source table';
COMMENT ON COLUMN pgembed.eval_sets.origin IS 'the file format it was imported from: beir (queries JSONL + qrels TSV) or jsonl';
COMMENT ON TABLE pgembed.eval_queries IS 'The queries of each evaluation set';
COMMENT ON TABLE pgembed.eval_judgments IS 'Rows judged for each query: relevance 0 irrelevant, above 0 relevant (graded)';
COMMENT ON COLUMN pgembed.eval_judgments.key IS 'the row''s primary key as a JSON object, as pgembed.search returns it';
COMMENT ON TABLE pgembed.eval_runs IS 'One row per evaluation run: target asked, pipeline and model that answered, metrics';
COMMENT ON COLUMN pgembed.eval_runs.target IS 'what was asked: an alias or a pipeline';
COMMENT ON COLUMN pgembed.eval_runs.metrics IS 'means over the set''s queries: ndcg@10, and recall@k, p@k, mrr@k for each k in ks';
COMMENT ON COLUMN pgembed.eval_runs.query_tokens IS 'tokens the query embeddings took (cached queries: 0); usage purpose query';

-- Model migrations and the live lane
COMMENT ON TABLE pgembed.bulk_lane IS 'When bulk work (backfill, repair, migration) may be claimed: opens..closes in time_zone, NULL always; live changes are claimed first in any case';
COMMENT ON COLUMN pgembed.bulk_lane.rate_share IS 'the share of each API key''s rate budget that bulk requests may take; live ones may take all of it';
COMMENT ON TABLE pgembed.model_migrations IS 'Model migrations of an alias: from_pipeline (the active one at start) to to_pipeline (the shadow of the new model), their phase and estimate';
COMMENT ON COLUMN pgembed.model_migrations.phase IS 'started (shadow backfilling), cut_over (the alias points at the shadow), rolled_back (back to from_pipeline), cleaned_up (the unused pipeline dropped)';
COMMENT ON COLUMN pgembed.model_migrations.estimate IS 'pgembed migrate plan''s dry run at start: rows, chunks, tokens, cached, usd, seconds';
COMMENT ON COLUMN pgembed.model_migrations.max_drop IS 'cutover refuses when a metric of the shadow is more than this many points (1 = 0.01) below the active''s';
COMMENT ON COLUMN pgembed.model_migrations.rollback_window IS 'how long after cutover rollback is possible; then the scheduled cleanup drops from_pipeline';
COMMENT ON TABLE pgembed.model_migration_events IS 'Each phase of a migration, refused and forced cutovers included, with who and the detail (metrics, reason)';

-- the provider's Batch API
COMMENT ON TABLE pgembed.provider_batches IS 'Bulk rows sent through the provider''s Batch API (pgembed batch): the outbox rows stay leased to it (lease) until it is collected or cancelled';
COMMENT ON COLUMN pgembed.provider_batches.state IS 'preparing (rows leased, nothing sent yet), submitted, collected (stored, the rest requeued), cancelled';
COMMENT ON COLUMN pgembed.provider_batches.provider_status IS 'the provider''s status at the last poll (validating, in_progress, finalizing, completed, expired, failed, cancelling, cancelled)';
COMMENT ON COLUMN pgembed.provider_batches.provider_id IS 'the provider''s batch id; NULL until the batch was created there';
COMMENT ON COLUMN pgembed.provider_batches.stored IS 'rows stored by the collection; requeued: rows given back to the outbox (changed, deleted, errored or expired lines)';
COMMENT ON TABLE pgembed.provider_batch_rows IS 'The outbox rows a provider batch holds, at the version it read: a row whose version has moved on is not stored from the batch';
COMMENT ON TABLE pgembed.provider_batch_lines IS 'One request line of a provider batch (custom_id line-<line>): the cache keys of its inputs in order, and the purpose and cost center it is billed to';
