-- pgembed model migrations: moving an alias from one model to another without a moment in
-- which its searches fail or come back empty. Five phases, each a function here (the
-- command line is `pgembed migrate …`, pgembed/model_migrations.py):
--   plan      pgembed.migration_target: what the dry run needs (the estimate itself counts
--             tokens with the new model's tokenizer, in Python: pgembed/estimate.py)
--   start     pgembed.start_migration: a shadow pipeline on the same source and content with
--             the new model; from then on every live change is embedded by both, and its
--             backfill is queued under purpose 'migration' (the bulk lane, see claim_from)
--   evaluate  pgembed.migration_evaluated records the runs of the alias's evaluation set
--             against both pipelines (pgembed.evaluation.runs)
--   cutover   pgembed.cutover_migration: the gate (metrics, missing and stale rows), then the
--             alias points at the shadow; the old pipeline stays live, the rollback target
--   rollback  pgembed.rollback_migration, within the window; cleanup
--             (pgembed.cleanup_migration, by hand or pgembed.cleanup_due_migrations from
--             the scheduler) drops the pipeline the alias no longer uses
-- Every phase is a row of pgembed.model_migration_events, with who.

-- The alias's open migration (not cleaned up), locked, or else its latest one; NULL when
-- the alias never had one. An alias that does not exist is an error.
CREATE OR REPLACE FUNCTION pgembed.alias_migration(p_alias text)
RETURNS pgembed.model_migrations
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations;
BEGIN
    PERFORM pgembed.active_pipeline(p_alias);
    SELECT * INTO m FROM pgembed.model_migrations x
     WHERE x.alias = p_alias
     ORDER BY x.phase = 'cleaned_up', x.id DESC
     LIMIT 1
       FOR UPDATE;
    RETURN m;
END
$$;

-- The pipeline an alias points at, locked (a migration's phases are one at a time). A name
-- that is a pipeline's, not an alias's, is refused with what to do: migrations move aliases.
CREATE OR REPLACE FUNCTION pgembed.active_pipeline(p_alias text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    active text;
BEGIN
    SELECT a.pipeline INTO active FROM pgembed.aliases a WHERE a.name = p_alias FOR UPDATE;
    IF FOUND THEN
        RETURN active;
    END IF;
    IF EXISTS (SELECT 1 FROM pgembed.pipelines p WHERE p.name = p_alias) THEN
        RAISE EXCEPTION 'pgembed: ''%'' is a pipeline, not an alias; a migration moves an alias', p_alias
            USING HINT = format('Give the pipeline an alias first: SELECT pgembed.set_alias(''NAME'', %L); '
                                'searches through the alias then follow the migration.', p_alias);
    END IF;
    RAISE EXCEPTION 'pgembed: no alias named ''%''', p_alias
        USING HINT = 'SELECT name, pipeline FROM pgembed.aliases shows the aliases.';
END
$$;

-- The size a backfill of model m would store: p_dimensions, checked, else the model's own.
CREATE OR REPLACE FUNCTION pgembed.target_dimensions(m pgembed.models, p_dimensions int)
RETURNS int
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    dims int := coalesce(p_dimensions, m.dimensions);
BEGIN
    IF dims < 1 OR dims > m.dimensions OR (dims <> m.dimensions AND NOT m.shortenable) THEN
        RAISE EXCEPTION 'pgembed: model % cannot give % dimensions', m.model, dims
            USING HINT = format('Leave dimensions out for the model''s own %s.', m.dimensions);
    END IF;
    RETURN dims;
END
$$;

-- What a dry run needs to make the worker's chunks: the source and its bound content, the
-- model, its size and price and limits, and the chunking create_pipeline would choose.
CREATE OR REPLACE FUNCTION pgembed.model_target(p_source regclass, p_content_bound text, p_prefixed boolean,
                                                m pgembed.models, p_dimensions int, p_chunking text,
                                                p_chunk_tokens int, p_chunk_overlap int)
RETURNS TABLE (source regclass, content_bound text, prefixed boolean, model text, dimensions int,
               native_dimensions int, chunking text, chunk_tokens int, chunk_overlap int, tokenizer text,
               usd_per_1m_tokens numeric, max_input_tokens int, max_batch_inputs int, max_batch_tokens int)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p_source, p_content_bound, p_prefixed, m.model, p_dimensions, m.dimensions, c.chunking,
           c.chunk_tokens, c.chunk_overlap, m.tokenizer, m.usd_per_1m_tokens, m.max_input_tokens,
           m.max_batch_inputs, m.max_batch_tokens
      FROM pgembed.chunking_settings(m, p_chunking, p_chunk_tokens, p_chunk_overlap) AS c
$$;

-- What a migration of p_alias to p_model would build, checked: the active pipeline, its
-- source and bound content, and the new pipeline's model, size and chunking (as
-- create_pipeline will choose them: fitted to the new model), with the model's price and
-- limits. The dry run (pgembed migrate plan) reads the rows through this.
CREATE OR REPLACE FUNCTION pgembed.migration_target(p_alias text, p_model text, p_dimensions int DEFAULT NULL)
RETURNS TABLE (active text, source regclass, content_bound text, prefixed boolean, model text,
               dimensions int, native_dimensions int, chunking text, chunk_tokens int,
               chunk_overlap int, tokenizer text, usd_per_1m_tokens numeric, max_input_tokens int,
               max_batch_inputs int, max_batch_tokens int)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p pgembed.pipelines;
    m pgembed.models;
    running pgembed.model_migrations;
    dims int;
BEGIN
    SELECT * INTO STRICT p FROM pgembed.pipelines q WHERE q.name = pgembed.active_pipeline(p_alias);
    running := pgembed.alias_migration(p_alias);
    IF running.phase IS NOT NULL AND running.phase <> 'cleaned_up' THEN
        RAISE EXCEPTION 'pgembed: alias ''%'' has a migration in progress (#%, %, to %)', p_alias,
            running.id, running.phase, running.to_model
            USING HINT = 'Finish it first: pgembed migrate cutover, rollback or cleanup ' || p_alias || '.';
    END IF;
    IF p_model IS NULL THEN
        RAISE EXCEPTION 'pgembed: a migration needs the model to migrate to, not NULL';
    END IF;
    m := pgembed.model_info(p_model);
    dims := pgembed.target_dimensions(m, p_dimensions);
    IF m.model = p.model AND dims = p.dimensions THEN
        RAISE EXCEPTION 'pgembed: alias ''%'' already uses % at % dimensions (pipeline %)', p_alias, m.model,
            dims, p.name;
    END IF;
    RETURN QUERY SELECT p.name, t.* FROM pgembed.model_target(p.source, p.content_bound, p.chunk_prefix IS NOT NULL,
                                                              m, dims, NULL, NULL, NULL) AS t;
END
$$;

-- The dry run of create_pipeline(..., backfill => true): what pipeline create --dry-run
-- reads the rows through. The arguments are create_pipeline's and are checked the same way
-- (content bound on the caller's schemas); nothing is created.
CREATE OR REPLACE FUNCTION pgembed.backfill_target_on_path(p_path text, p_source regclass, p_content text,
                                                           p_model text, p_dimensions int, p_chunking text,
                                                           p_chunk_tokens int, p_chunk_overlap int,
                                                           p_chunk_prefix text)
RETURNS TABLE (source regclass, content_bound text, prefixed boolean, model text, dimensions int,
               native_dimensions int, chunking text, chunk_tokens int, chunk_overlap int, tokenizer text,
               usd_per_1m_tokens numeric, max_input_tokens int, max_batch_inputs int, max_batch_tokens int)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    refusal text := pgembed.source_refusal(p_source);
    m pgembed.models := pgembed.model_info(p_model);
    bound text;
BEGIN
    IF refusal IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: %', refusal;
    END IF;
    IF p_content IS NULL THEN
        RAISE EXCEPTION 'pgembed: content must be a SQL expression over the columns of %, not NULL', p_source;
    END IF;
    IF p_chunk_prefix IS NOT NULL THEN
        PERFORM pgembed.probe_expression(p_source, p_chunk_prefix, p_path, 'chunk_prefix');
    END IF;
    SELECT e.bound INTO bound
      FROM pgembed.probe_expression(p_source, CASE WHEN p_chunk_prefix IS NULL THEN p_content
                                                   ELSE pgembed.prefixed_content(p_chunk_prefix, p_content) END,
                                    p_path, p_bind => true) AS e;
    RETURN QUERY SELECT * FROM pgembed.model_target(p_source, bound, p_chunk_prefix IS NOT NULL, m,
                                                    pgembed.target_dimensions(m, p_dimensions), p_chunking,
                                                    p_chunk_tokens, p_chunk_overlap);
END
$$;

-- No SET clause, as create_pipeline: it reads the content on the caller's own schemas.
CREATE OR REPLACE FUNCTION pgembed.backfill_target(p_source regclass, p_content text, p_model text,
                                                   p_dimensions int DEFAULT NULL, p_chunking text DEFAULT NULL,
                                                   p_chunk_tokens int DEFAULT NULL, p_chunk_overlap int DEFAULT NULL,
                                                   p_chunk_prefix text DEFAULT NULL)
RETURNS TABLE (source regclass, content_bound text, prefixed boolean, model text, dimensions int,
               native_dimensions int, chunking text, chunk_tokens int, chunk_overlap int, tokenizer text,
               usd_per_1m_tokens numeric, max_input_tokens int, max_batch_inputs int, max_batch_tokens int)
LANGUAGE sql
AS $$
    SELECT * FROM pgembed.backfill_target_on_path(
        (SELECT coalesce(pg_catalog.string_agg(pg_catalog.quote_ident(s), ', ' ORDER BY i), 'pg_catalog')
           FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) WITH ORDINALITY AS u(s, i)
          WHERE NOT pg_catalog.starts_with(s, 'pg_temp')),
        $1, $2, $3, $4, $5, $6, $7, $8)
$$;

CREATE OR REPLACE FUNCTION pgembed.migration_event(p_migration bigint, p_event text, p_detail jsonb DEFAULT '{}')
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgembed.model_migration_events (migration, event, detail) VALUES (p_migration, p_event, p_detail)
$$;

-- Starts a migration: the shadow pipeline (same source, content, chunk prefix, cost center,
-- index and storage as the active one; chunking fitted to the new model), whose backfill is
-- queued under purpose 'migration'; the alias keeps pointing at the active pipeline.
-- p_estimate is the dry run's result, kept to compare the spend with. Returns the id.
CREATE OR REPLACE FUNCTION pgembed.start_migration(p_alias text, p_model text, p_dimensions int DEFAULT NULL,
                                                   p_estimate jsonb DEFAULT '{}', p_name text DEFAULT NULL,
                                                   p_max_drop numeric DEFAULT 3,
                                                   p_window interval DEFAULT '48 hours')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    p pgembed.pipelines;
    shadow text;
    new_id bigint;
BEGIN
    IF p_max_drop IS NULL OR p_max_drop < 0 THEN
        RAISE EXCEPTION 'pgembed: the gate''s max_drop must be 0 or more points, not %', coalesce(p_max_drop::text, 'NULL');
    END IF;
    IF p_window IS NULL OR p_window <= interval '0' THEN
        RAISE EXCEPTION 'pgembed: the rollback window must be positive, not %', coalesce(p_window::text, 'NULL');
    END IF;
    SELECT * INTO STRICT t FROM pgembed.migration_target(p_alias, p_model, p_dimensions);
    SELECT * INTO STRICT p FROM pgembed.pipelines q WHERE q.name = t.active;
    shadow := pgembed.create_pipeline_on_path(
        p.search_path, p.source, p.content, t.model, t.dimensions, p.index_type, p.index_options, p.distance,
        cost_center => p.cost_center, name => p_name, chunk_prefix => p.chunk_prefix, storage => p.storage,
        quantization => p.quantization, rerank => p.rerank);
    -- create_pipeline queued the rows as a backfill (and deferred a large one's HNSW index);
    -- it held the source locked since, so these are all of the shadow's rows
    UPDATE pgembed.outbox o SET purpose = 'migration' WHERE o.pipeline = shadow;
    INSERT INTO pgembed.model_migrations (alias, from_pipeline, to_pipeline, from_model, to_model, to_dimensions,
                                          estimate, max_drop, rollback_window)
    VALUES (p_alias, p.name, shadow, p.model, t.model, t.dimensions, coalesce(p_estimate, '{}'), p_max_drop,
            p_window)
    RETURNING model_migrations.id INTO new_id;
    PERFORM pgembed.migration_event(new_id, 'started', jsonb_build_object('from', p.name, 'to', shadow,
                                                                      'model', t.model, 'dimensions', t.dimensions));
    RETURN new_id;
END
$$;

-- The open migration of an alias in one of p_phases, locked; otherwise an error that says
-- what state it is in and what can be done instead.
CREATE OR REPLACE FUNCTION pgembed.migration_in(p_alias text, p_phases text[], p_doing text)
RETURNS pgembed.model_migrations
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations := pgembed.alias_migration(p_alias);
BEGIN
    IF m.id IS NULL THEN
        RAISE EXCEPTION 'pgembed: alias ''%'' has no migration to %', p_alias, p_doing
            USING HINT = 'pgembed migrate start ' || p_alias || ' --model MODEL begins one.';
    END IF;
    IF m.phase = ANY (p_phases) THEN
        RETURN m;
    END IF;
    RAISE EXCEPTION 'pgembed: cannot % migration #% of alias ''%'': it is %', p_doing, m.id, p_alias,
        CASE m.phase
            WHEN 'started' THEN 'not cut over yet'
            WHEN 'cut_over' THEN format('cut over already (at %s)', m.cut_over_at)
            WHEN 'rolled_back' THEN 'rolled back'
            ELSE format('cleaned up (at %s)', m.finished_at) END
        USING HINT = CASE m.phase
            WHEN 'started' THEN 'pgembed migrate cutover ' || p_alias || ' first.'
            WHEN 'cut_over' THEN 'pgembed migrate rollback ' || p_alias || ' goes back; cleanup ends it.'
            WHEN 'rolled_back' THEN 'pgembed migrate cleanup ' || p_alias || ' drops the shadow.'
            ELSE 'It is over; pgembed migrate start ' || p_alias || ' --model MODEL begins another.' END;
END
$$;

-- Records an evaluation of both pipelines (pgembed.eval_runs ids) for the gate.
CREATE OR REPLACE FUNCTION pgembed.migration_evaluated(p_alias text, p_eval_set text, p_active_run bigint,
                                                       p_shadow_run bigint)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations := pgembed.migration_in(p_alias, '{started}', 'evaluate');
BEGIN
    UPDATE pgembed.model_migrations x SET eval_set = p_eval_set WHERE x.id = m.id;
    PERFORM pgembed.migration_event(m.id, 'evaluated', jsonb_build_object(
        'eval_set', p_eval_set, 'active_run', p_active_run, 'shadow_run', p_shadow_run));
    RETURN m.id;
END
$$;

-- What stands between a migration and its cutover: per metric of the latest evaluation of
-- the active pipeline, the shadow's more than max_drop points below it; the shadow's
-- missing (its backfill not done, or failed) and stale rows. jsonb: {"failed": [{metric, active, shadow, points}], "missing",
-- "stale", "evaluated"}.
CREATE OR REPLACE FUNCTION pgembed.cutover_gate(m pgembed.model_migrations)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    active jsonb;
    shadow jsonb;
    failed jsonb;
    gaps record;
BEGIN
    SELECT r.metrics INTO active FROM pgembed.eval_runs r
     WHERE r.pipeline = m.from_pipeline AND r.eval_set = m.eval_set AND r.at >= m.started_at
     ORDER BY r.id DESC LIMIT 1;
    SELECT r.metrics INTO shadow FROM pgembed.eval_runs r
     WHERE r.pipeline = m.to_pipeline AND r.eval_set = m.eval_set AND r.at >= m.started_at
     ORDER BY r.id DESC LIMIT 1;
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'metric', a.key, 'active', a.value::numeric, 'shadow', (shadow ->> a.key)::numeric,
               'points', round((a.value::numeric - coalesce((shadow ->> a.key)::numeric, 0)) * 100, 2))
               ORDER BY a.key), '[]')
      INTO failed
      FROM jsonb_each_text(coalesce(active, '{}')) AS a
     WHERE (a.value::numeric - coalesce((shadow ->> a.key)::numeric, 0)) * 100 > m.max_drop;
    -- missing: what the audit calls missing or failed, and the backfill still queued (a live
    -- change queued now is no reason to wait: both pipelines embed it)
    SELECT count(*) FILTER (WHERE g.kind IN ('missing', 'failed'))
           + (SELECT count(*) FROM pgembed.outbox o
               WHERE o.pipeline = m.to_pipeline AND o.purpose IN ('backfill', 'repair', 'migration')) AS missing,
           count(*) FILTER (WHERE g.kind = 'stale') AS stale
      INTO gaps
      FROM pgembed.gaps(m.to_pipeline) AS g;
    RETURN jsonb_build_object('failed', failed, 'missing', gaps.missing, 'stale', gaps.stale,
                              'evaluated', active IS NOT NULL AND shadow IS NOT NULL,
                              'max_drop', m.max_drop);
END
$$;

-- Cutover: the alias points at the shadow, if the gate lets it (or p_force, with a reason:
-- recorded with who). A refusal is recorded too, and returned: {"cut_over": false, ...the
-- gate}. The old pipeline stays, in sync, as the rollback target.
CREATE OR REPLACE FUNCTION pgembed.cutover_migration(p_alias text, p_force boolean DEFAULT false,
                                                     p_reason text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations := pgembed.migration_in(p_alias, '{started}', 'cut over');
    gate jsonb := pgembed.cutover_gate(m);
    passed boolean := jsonb_array_length(gate -> 'failed') = 0 AND (gate ->> 'missing')::bigint = 0
                      AND (gate ->> 'stale')::bigint = 0 AND (gate ->> 'evaluated')::boolean;
BEGIN
    IF coalesce(p_force, false) AND nullif(btrim(coalesce(p_reason, '')), '') IS NULL THEN
        RAISE EXCEPTION 'pgembed: a forced cutover needs a reason'
            USING HINT = 'pgembed migrate cutover ' || p_alias || ' --force --reason "why"';
    END IF;
    IF NOT passed AND NOT coalesce(p_force, false) THEN
        PERFORM pgembed.migration_event(m.id, 'cutover_refused', gate);
        RETURN gate || jsonb_build_object('cut_over', false, 'migration', m.id);
    END IF;
    gate := gate || jsonb_build_object('forced', NOT passed, 'reason', p_reason);
    PERFORM pgembed.set_alias(p_alias, m.to_pipeline);
    UPDATE pgembed.model_migrations x SET phase = 'cut_over', cut_over_at = now() WHERE x.id = m.id;
    PERFORM pgembed.migration_event(m.id, 'cut_over', gate);
    RETURN gate || jsonb_build_object('cut_over', true, 'migration', m.id);
END
$$;

-- Rollback, within the window: the alias points at the old pipeline again, at once.
CREATE OR REPLACE FUNCTION pgembed.rollback_migration(p_alias text)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations := pgembed.migration_in(p_alias, '{cut_over}', 'roll back');
BEGIN
    IF now() > m.cut_over_at + m.rollback_window THEN
        RAISE EXCEPTION 'pgembed: the rollback window of migration #% of alias ''%'' ended at %', m.id, p_alias,
            m.cut_over_at + m.rollback_window
            USING HINT = 'Migrate back instead: pgembed migrate start ' || p_alias || ' --model ' || m.from_model;
    END IF;
    PERFORM pgembed.set_alias(p_alias, m.from_pipeline);
    UPDATE pgembed.model_migrations x SET phase = 'rolled_back' WHERE x.id = m.id;
    PERFORM pgembed.migration_event(m.id, 'rolled_back', jsonb_build_object('to', m.from_pipeline));
    RETURN m.id;
END
$$;

-- Cleanup: drops the pipeline the alias does not use (after a cutover the old one, after a
-- rollback or before any cutover the shadow) and its vectors. Returns the dropped name.
CREATE OR REPLACE FUNCTION pgembed.cleanup_migration(p_alias text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m pgembed.model_migrations := pgembed.migration_in(p_alias, '{started,cut_over,rolled_back}', 'clean up');
    unused text := CASE m.phase WHEN 'cut_over' THEN m.from_pipeline ELSE m.to_pipeline END;
BEGIN
    IF EXISTS (SELECT 1 FROM pgembed.pipelines q WHERE q.name = unused) THEN
        PERFORM pgembed.drop_pipeline(unused);
    END IF;
    UPDATE pgembed.model_migrations x SET phase = 'cleaned_up', finished_at = now() WHERE x.id = m.id;
    PERFORM pgembed.migration_event(m.id, 'cleaned_up', jsonb_build_object('dropped', unused, 'after', m.phase));
    RETURN unused;
END
$$;

-- The scheduled cleanup: every migration whose rollback window is over. Returns how many.
CREATE OR REPLACE FUNCTION pgembed.cleanup_due_migrations()
RETURNS int
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a text;
    n int := 0;
BEGIN
    FOR a IN SELECT x.alias FROM pgembed.model_migrations x
              WHERE x.phase IN ('cut_over', 'rolled_back') AND x.cut_over_at + x.rollback_window < now()
              ORDER BY x.id LOOP
        PERFORM pgembed.cleanup_migration(a);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- Each migration with its progress: the shadow's rows still queued (outbox and unexpanded
-- statements), what the migration has spent so far (usage of purpose 'migration') beside
-- the estimate, an ETA from the pace so far, and until when rollback is possible.
CREATE OR REPLACE VIEW pgembed.model_migration_status AS
SELECT m.id,
       m.alias,
       m.phase,
       m.from_pipeline,
       m.to_pipeline,
       m.to_model,
       (m.estimate ->> 'rows')::bigint AS rows,
       q.queued,
       greatest(coalesce((m.estimate ->> 'rows')::bigint, 0) - q.queued, 0) AS done,
       u.tokens,
       u.usd,
       (m.estimate ->> 'tokens')::bigint AS estimated_tokens,
       (m.estimate ->> 'usd')::numeric AS estimated_usd,
       CASE WHEN q.queued = 0 THEN interval '0'
            WHEN coalesce((m.estimate ->> 'rows')::bigint, 0) > q.queued
            THEN (now() - m.started_at) * (q.queued::double precision
                                           / ((m.estimate ->> 'rows')::bigint - q.queued)) END AS eta,
       m.started_at,
       m.started_by,
       m.cut_over_at,
       m.cut_over_at + m.rollback_window AS rollback_until,
       m.finished_at
  FROM pgembed.model_migrations m
 CROSS JOIN LATERAL (
       SELECT ((SELECT count(*) FROM pgembed.outbox o WHERE o.pipeline = m.to_pipeline)
              + (SELECT coalesce(sum(s.key_count - s.expanded), 0) FROM pgembed.outbox_statements s
                  WHERE s.pipeline = m.to_pipeline))::bigint AS queued) AS q
 CROSS JOIN LATERAL (
       SELECT coalesce(sum(c.tokens), 0)::bigint AS tokens, coalesce(sum(c.usd), 0) AS usd
         FROM pgembed.usage_cost c
        WHERE c.pipeline = m.to_pipeline AND c.purpose = 'migration' AND c.at >= m.started_at) AS u;
