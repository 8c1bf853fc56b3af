-- pgembed consistency: is every pipeline's destination table in step with its source table?
--
-- A gap is one key of one pipeline that nothing is going to fix by itself:
--   missing   a live source row with no vectors that is neither queued nor failed
--   orphaned  vectors whose source row is gone, and the key is not queued
--   stale     vectors whose stored content_hash is not the hash of the row's current content
--             (sha256 of the content's UTF-8 bytes, as pgembed/cache.py document_hash), not
--             queued and not failed
--   failed    a key parked in pgembed.failures, waiting for a DBA (failures --retry)
-- Rows in the outbox are not gaps: a worker will process them (pipeline_status counts them).
--
-- Gaps are found by comparing the tables themselves, without relying on the outbox having
-- recorded a change, so the audit finds what triggers never saw (triggers disabled, session_replication_role = replica,
-- restores, hand-made edits). Each pipeline has its own source table and content
-- expression, hence per-pipeline dynamic SQL: identifiers come from pgembed.pipelines and
-- the catalogs and go through format('%I'); the only user-written SQL is the content
-- expression, as create_pipeline validated and bound it (content_bound, see gaps() below
-- for why that matters here).
--
-- The source table of a pipeline as a schema-qualified, quoted name, or NULL when it was
-- dropped behind pgembed's back. Qualified explicitly, so that no search_path can make the
-- generated queries read another table of the same name.
CREATE OR REPLACE FUNCTION pgembed.source_name(p pgembed.pipelines)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%I.%I', n.nspname, c.relname)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p.source
$$;

-- The key of a row of alias p_alias as the outbox holds it: the same text the triggers
-- write, jsonb_build_array(col::text, ...).
CREATE OR REPLACE FUNCTION pgembed.key_json_sql(p pgembed.pipelines, p_alias text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'pg_catalog.jsonb_build_array('
           || pgembed.sql_list(quote_ident(p_alias) || '.%1$I::pg_catalog.text', p.key_columns) || ')'
$$;

-- "this key is not queued": not in the outbox, nor in a statement no worker has expanded yet.
CREATE OR REPLACE FUNCTION pgembed.not_queued_sql(p pgembed.pipelines, p_key text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('NOT EXISTS (SELECT 1 FROM pgembed.outbox o WHERE o.pipeline = %1$L AND o.key = %2$s) '
                  'AND NOT EXISTS (SELECT 1 FROM pgembed.outbox_statements b, '
                  'pg_catalog.unnest(b.keys[b.expanded + 1:]) AS bk(key) '
                  'WHERE b.pipeline = %1$L AND pg_catalog.jsonb_build_array(bk.key) = %2$s)', p.name, p_key)
$$;

-- "this key is not parked in pgembed.failures" (nor retrying there).
CREATE OR REPLACE FUNCTION pgembed.not_failed_sql(p pgembed.pipelines, p_key text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('NOT EXISTS (SELECT 1 FROM pgembed.failures f WHERE f.pipeline = %L AND f.key = %s)',
                  p.name, p_key)
$$;

-- The SQL of one gap kind (missing, orphaned, stale) of one pipeline, returning
-- (key jsonb, since timestamptz). Every lookup is an anti-join on an indexed key (on a
-- whole table the planner hashes; for a few rows it probes the index), never a scan per row:
--   destination  PRIMARY KEY (key columns..., chunk_seq); chunk 0 exists for every embedded row
--   source       its primary key
--   outbox       PRIMARY KEY (pipeline, key), key = jsonb array of the key columns as text
--   failures     PRIMARY KEY (pipeline, key)
-- It runs on search_path pg_catalog, pg_temp: what it names itself is qualified, and the
-- stale query evaluates content_bound, whose names were bound when the pipeline was
-- created. pgembed.explain_gaps() shows the plans.
CREATE OR REPLACE FUNCTION pgembed.gap_sql(p pgembed.pipelines, p_kind text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src text := pgembed.source_name(p);
    dest text := format('pgembed.%I', p.destination);
    key_s text := pgembed.key_json_sql(p, 's');
    key_d text := pgembed.key_json_sql(p, 'd');
    same_key text := pgembed.sql_list('d.%1$I = s.%1$I', p.key_columns, ' AND ');
BEGIN
    IF src IS NULL THEN
        RAISE EXCEPTION 'pgembed: the source table of pipeline "%" no longer exists', p.name
            USING HINT = 'Drop the pipeline: SELECT pgembed.drop_pipeline(' || quote_literal(p.name) || ').';
    END IF;
    CASE p_kind
    WHEN 'missing' THEN
        -- nothing records when a row lost (or never got) its vectors: the pipeline's birth
        -- is the best lower bound there is
        RETURN format($q$
SELECT %1$s AS key, %2$L::pg_catalog.timestamptz AS since
  FROM %3$s s
 WHERE NOT EXISTS (SELECT 1 FROM %4$s d WHERE %5$s AND d.chunk_seq = 0)
   AND %6$s
   AND %7$s$q$,
            key_s, p.created_at, src, dest, same_key,
            pgembed.not_queued_sql(p, key_s), pgembed.not_failed_sql(p, key_s));
    WHEN 'empty' THEN
        -- Of the keys in $1 (the missing ones), those whose content is NULL or blank (ASCII
        -- whitespace only, as the worker decides): nothing to embed, so not missing. The rows
        -- are read through the pipeline's own reader, a slice of keys a call, as a worker
        -- reads a batch: the content is evaluated for those rows only (in one query over the
        -- table, the planner may evaluate it for every row first, and a row that raises, a
        -- parked failure, would sink the check), and exactly as the worker evaluates it.
        RETURN format($q$
SELECT r.key, NULL::pg_catalog.timestamptz AS since
  FROM pg_catalog.generate_series(1, pg_catalog.cardinality($1::pg_catalog.jsonb[]), 500) AS slice(first)
 CROSS JOIN LATERAL pgembed.%1$I(pg_catalog.to_jsonb($1[slice.first : slice.first + 499])) AS r
 WHERE r.found AND coalesce(r.content, '') OPERATOR(pg_catalog.!~) E'[^ \t\n\r\f\v]'$q$,
            'p' || p.id || '_read');
    WHEN 'orphaned' THEN
        RETURN format($q$
SELECT %1$s AS key, d.embedded_at AS since
  FROM %2$s d
 WHERE d.chunk_seq = 0
   AND NOT EXISTS (SELECT 1 FROM %3$s s WHERE %4$s)
   AND %5$s$q$,
            key_d, dest, src, same_key, pgembed.not_queued_sql(p, key_d));
    WHEN 'stale' THEN
        -- the content is evaluated in a subquery over the source table alone, unaliased, so
        -- it reads exactly as in the generated reader (columns, even table.column, never
        -- clash with the destination's); the planner flattens the subquery into the join.
        RETURN format($q$
SELECT %1$s AS key, d.embedded_at AS since
  FROM (SELECT %2$s,
               pg_catalog.sha256(pg_catalog.convert_to((%3$s)::pg_catalog.text, 'UTF8'))
                   AS pgembed_current_hash
          FROM %4$s) AS s
  JOIN %5$s d ON %6$s AND d.chunk_seq = 0
 WHERE s.pgembed_current_hash IS DISTINCT FROM d.content_hash
   AND %7$s
   AND %8$s$q$,
            key_s, pgembed.sql_list('%1$I', p.key_columns), p.content_bound, src, dest, same_key,
            pgembed.not_queued_sql(p, key_s), pgembed.not_failed_sql(p, key_s));
    ELSE
        RAISE EXCEPTION 'pgembed: gap kind must be missing, orphaned, stale or empty, not %', p_kind;
    END CASE;
END
$$;

-- The pipelines a call is about: one by name (an unknown name is an error, not an empty
-- answer), or all of them when the name is NULL.
CREATE OR REPLACE FUNCTION pgembed.pipelines_named(p_pipeline text)
RETURNS SETOF pgembed.pipelines
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY SELECT * FROM pgembed.pipelines q
                  WHERE p_pipeline IS NULL OR q.name = p_pipeline ORDER BY q.name;
    IF NOT FOUND AND p_pipeline IS NOT NULL THEN
        RAISE EXCEPTION 'pgembed: no pipeline named "%"', p_pipeline
            USING HINT = 'pgembed pipeline list shows the pipelines.';
    END IF;
END
$$;

-- Every gap of one pipeline, or of all.
--
-- SECURITY DEFINER, so that a DBA in pgembed_reader, who may read the views and nothing
-- else, can read consistency_gaps and pipeline_status without SELECT on the queue, the
-- vectors or the application's tables. EXECUTE is revoked from PUBLIC (privileges.sql grants
-- it to pgembed_reader); the search_path is pinned like everywhere here; row_security is off,
-- so that a source table's row-level security policies (code of the table's owner) never
-- run with our rights: such a table is an error here, not a silent subset.
--
-- The hazard is the stale check: it evaluates a pipeline's content expression, SQL a user
-- wrote, with the rights of pgembed's owner. What makes that safe:
--   * It evaluates content_bound, not content: the expression with every name bound when
--     the pipeline was created (pgembed.probe_expression), on search_path pg_catalog,
--     pg_temp. A function, operator or type planted later in a schema of the creator's
--     search_path (by whoever may create objects there) is never called.
--   * create_pipeline refused anything but one expression over the source table's own
--     columns (no subquery, no other table) calling IMMUTABLE or STABLE functions owned by
--     the creator or a superuser; creating a pipeline needs the owner's rights on schema
--     pgembed anyway.
--   * Before each evaluation, every function it calls (content_functions) must still exist
--     and belong to a superuser or to a role that already has our privileges
--     (pg_has_role(owner, current_user, 'USAGE')): no one else's code may run as us. A
--     function given to another role later, or created by a pipeline creator other than
--     pgembed's owner, stops the stale check of that pipeline with a WARNING that says so;
--     the rest of the answer stands.
--   * The caller gets keys and timestamps. The error text of a failing expression, which
--     may quote row data, only goes to a caller who may read the source table.
-- Left to the owners of types and operators: code they attach to them (a domain's CHECK, an
-- operator dropped and made again over another function) runs with our rights if a content
-- expression uses them; keep those owned by pgembed's owner or a superuser.
--
-- A content expression that raises for some row (a bad cast, division by zero) would sink
-- the whole answer; instead that pipeline's stale check is skipped with a WARNING naming
-- the error. The worker parks such rows in pgembed.failures, where they show as `failed`.
CREATE OR REPLACE FUNCTION pgembed.gaps(p_pipeline text DEFAULT NULL)
RETURNS TABLE (pipeline text, key jsonb, kind text, since timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
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
SET row_security = off
AS $$
#variable_conflict use_column
DECLARE
    p pgembed.pipelines;
    problem text;
    untrusted text;
    stale_keys jsonb[];
    stale_since timestamptz[];
    missing_keys jsonb[];
    missing_since timestamptz[];
    empty_keys jsonb[];
BEGIN
    FOR p IN SELECT * FROM pgembed.pipelines_named(p_pipeline) LOOP
        RETURN QUERY
            SELECT p.name, f.key, 'failed'::text, f.first_failed_at
              FROM pgembed.failures f
             WHERE f.pipeline = p.name AND f.parked_at IS NOT NULL;
        problem := pgembed.source_problem(p);
        IF problem IS NOT NULL THEN  -- one such pipeline does not stop the audit of the others
            RAISE WARNING 'pgembed: pipeline "%": not audited: %', p.name, problem
                USING HINT = 'A dropped source: drop the pipeline. Row-level security: see README, "Privileges and roles".';
            CONTINUE;
        END IF;

        RETURN QUERY EXECUTE format('SELECT %L::pg_catalog.text, g.key, %L::pg_catalog.text, g.since FROM (%s) g',
                                    p.name, 'orphaned', pgembed.gap_sql(p, 'orphaned'));
        -- collected first, so that a failing expression leaves no half-returned rows
        stale_keys := NULL;
        stale_since := NULL;
        empty_keys := '{}';
        EXECUTE format('SELECT pg_catalog.array_agg(g.key), pg_catalog.array_agg(g.since) FROM (%s) g',
                       pgembed.gap_sql(p, 'missing'))
           INTO missing_keys, missing_since;
        SELECT string_agg(format('%s (%s)', f.fn, coalesce('owned by ' || pr.proowner::regrole::text,
                                                             'dropped')), ', ')
          INTO untrusted
          FROM unnest(p.content_functions) AS f(fn)
          LEFT JOIN pg_catalog.pg_proc pr ON pr.oid = pg_catalog.to_regprocedure(f.fn)
         WHERE pr.oid IS NULL
            OR NOT (pg_catalog.pg_has_role(pr.proowner, current_user, 'USAGE')
                    OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = pr.proowner));
        IF untrusted IS NOT NULL THEN
            RAISE WARNING 'pgembed: pipeline "%": stale rows not checked: its content expression calls functions that may not run with the rights of %: %',
                p.name, current_user, untrusted
                USING HINT = format('Make %s or a superuser own the function (ALTER FUNCTION ... OWNER TO ...), '
                                    'or create the pipeline again.', current_user);
        ELSE
            BEGIN
                EXECUTE format('SELECT pg_catalog.array_agg(g.key), pg_catalog.array_agg(g.since) '
                               'FROM (%s) g', pgembed.gap_sql(p, 'stale'))
                   INTO stale_keys, stale_since;
            EXCEPTION WHEN OTHERS THEN  -- not a cancel or statement_timeout: those still stop us
                RAISE WARNING 'pgembed: pipeline "%": stale rows not checked, the content expression failed: %',
                    p.name, CASE WHEN pg_catalog.has_table_privilege(session_user, p.source, 'SELECT')
                                 THEN SQLERRM ELSE 'SQLSTATE ' || SQLSTATE END;
            END;
            -- apart, so that a stale check that failed on other rows does not hide empty ones
            BEGIN
                IF missing_keys IS NOT NULL THEN
                    EXECUTE format('SELECT coalesce(pg_catalog.array_agg(g.key), %L) FROM (%s) g',
                                   '{}', pgembed.gap_sql(p, 'empty'))
                       INTO empty_keys USING missing_keys;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'pgembed: pipeline "%": rows with nothing to embed not told apart from missing ones: %',
                    p.name, CASE WHEN pg_catalog.has_table_privilege(session_user, p.source, 'SELECT')
                                 THEN SQLERRM ELSE 'SQLSTATE ' || SQLSTATE END;
            END;
        END IF;
        RETURN QUERY
            SELECT p.name, u.key, 'stale'::text, u.since
              FROM unnest(stale_keys, stale_since) AS u(key, since);
        -- a row with nothing to embed has no vectors, and is not missing them
        RETURN QUERY
            SELECT p.name, u.key, CASE WHEN u.key = ANY (empty_keys) THEN 'empty' ELSE 'missing' END, u.since
              FROM unnest(missing_keys, missing_since) AS u(key, since);
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION pgembed.gaps(text) FROM PUBLIC;

-- EXPLAIN (FORMAT JSON) of each gap query of a pipeline, run the way gaps() runs it: what a
-- DBA reads to check that the anti-joins use the indexes on a big table. Unlike gaps() it
-- runs with the caller's rights (with p_analyze it runs the queries).
CREATE OR REPLACE FUNCTION pgembed.explain_gaps(p_pipeline text, p_analyze boolean DEFAULT false)
RETURNS TABLE (kind text, plan json)
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
#variable_conflict use_column
DECLARE
    p pgembed.pipelines;
    k text;
BEGIN
    SELECT * INTO p FROM pgembed.pipelines_named(coalesce(p_pipeline, ''));
    FOREACH k IN ARRAY '{missing,orphaned,stale}'::text[] LOOP
        kind := k;
        EXECUTE format('EXPLAIN (FORMAT JSON, ANALYZE %s) %s', p_analyze::text, pgembed.gap_sql(p, k))
           INTO plan;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Source rows, embedded rows and the last write of one pipeline's tables. SECURITY DEFINER
-- for pipeline_status, like gaps() (EXECUTE for pgembed_reader only); it runs no user-written
-- SQL, only count(*) and max() over tables named from the catalogs.
CREATE OR REPLACE FUNCTION pgembed.pipeline_counts(p_pipeline text,
                                                   OUT source_rows bigint,
                                                   OUT embedded_rows bigint,
                                                   OUT last_embedded_at timestamptz)
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET row_security = off
AS $$
DECLARE
    p pgembed.pipelines;
    src text;
    problem text;
BEGIN
    SELECT * INTO p FROM pgembed.pipelines_named(coalesce(p_pipeline, ''));
    problem := pgembed.source_problem(p);
    IF problem IS NULL THEN
        src := pgembed.source_name(p);
    ELSE  -- dropped behind pgembed's back, or not readable here: source_rows NULL
        RAISE WARNING 'pgembed: pipeline "%": source rows not counted: %', p.name, problem;
    END IF;
    EXECUTE format('SELECT %s, count(*) FILTER (WHERE d.chunk_seq = 0), max(d.embedded_at) '
                   'FROM pgembed.%I d',
                   coalesce('(SELECT count(*) FROM ' || src || ')', 'NULL'), p.destination)
       INTO source_rows, embedded_rows, last_embedded_at;
END
$$;

REVOKE ALL ON FUNCTION pgembed.pipeline_counts(text) FROM PUBLIC;

-- One row per gap, all pipelines. For one pipeline, SELECT * FROM pgembed.gaps('name')
-- computes only that one.
CREATE OR REPLACE VIEW pgembed.consistency_gaps AS
SELECT g.pipeline, g.key, g.kind, g.since
  FROM pgembed.gaps() AS g
 WHERE g.kind <> 'empty';  -- rows with nothing to embed are no gap (pipeline_status counts them)

-- The health of each pipeline at a glance: row counts, the queue and parked failures live;
-- missing, orphaned and stale as the latest audit found them (gaps_checked_at: when it
-- started; NULL until a first audit of the pipeline). Finding gaps compares every source
-- row with its vectors and hashes its content, seconds per million rows: the scheduler's
-- periodic audit pays that, and consistency_gaps whenever it is read, not a status glance.
-- After a repairing audit those counts are 0: what it found is queued or deleted.
-- The queue splits three ways:
--   queued     ready to be claimed (including leases that expired: a worker died, and the
--              keys of bulk statements that no worker has expanded yet)
--   in_flight  held under a live lease
--   retrying   waiting out the backoff after a failed attempt
-- oldest_gap: how long the oldest unresolved thing (gap or queued row) has waited.
-- failed: parked failures; failed_by_class: the same by class ({"too_long": 3, ...}).
CREATE OR REPLACE VIEW pgembed.pipeline_status AS
SELECT p.name AS pipeline,
       p.model,
       c.source_rows,
       c.embedded_rows,
       q.queued + b.keys AS queued,
       q.in_flight,
       q.retrying,
       f.failed,
       a.missing,
       a.orphaned,
       a.stale,
       now() - LEAST(q.oldest, b.oldest, f.oldest, a.oldest) AS oldest_gap,
       c.last_embedded_at,
       a.checked_at AS gaps_checked_at,
       a.empty,
       f.failed_by_class
  FROM pgembed.pipelines p
 CROSS JOIN LATERAL pgembed.pipeline_counts(p.name) AS c
 CROSS JOIN LATERAL (
       SELECT count(*) FILTER (WHERE pgembed.outbox_state(o.lease_id, o.available_at) = 'queued') AS queued,
              count(*) FILTER (WHERE pgembed.outbox_state(o.lease_id, o.available_at) = 'in_flight') AS in_flight,
              count(*) FILTER (WHERE pgembed.outbox_state(o.lease_id, o.available_at) = 'retrying') AS retrying,
              -- rows out in a provider batch (pgembed/batch_api/) wait for the provider, for
              -- up to a day, not for a worker: they do not make the queue look stuck
              min(o.queued_at) FILTER (WHERE NOT (starts_with(coalesce(o.leased_by, ''), 'batch-api:')
                                                  AND o.available_at > now())) AS oldest
         FROM pgembed.outbox o
        WHERE o.pipeline = p.name) AS q
 CROSS JOIN LATERAL (
       SELECT coalesce(sum(ob.key_count - ob.expanded), 0) AS keys, min(ob.queued_at) AS oldest
         FROM pgembed.outbox_statements ob
        WHERE ob.pipeline = p.name) AS b
 CROSS JOIN LATERAL (
       SELECT coalesce(sum(n), 0)::bigint AS failed, min(oldest) AS oldest,
              coalesce(jsonb_object_agg(class, n ORDER BY class), '{}') AS failed_by_class
         FROM (SELECT x.class, count(*) AS n, min(x.first_failed_at) AS oldest
                 FROM pgembed.failures x
                WHERE x.pipeline = p.name AND x.parked_at IS NOT NULL
                GROUP BY x.class) AS x) AS f
  LEFT JOIN LATERAL (
       SELECT r.started_at AS checked_at,
              CASE WHEN r.repaired THEN 0 ELSE af.missing END AS missing,
              CASE WHEN r.repaired THEN 0 ELSE af.orphaned END AS orphaned,
              CASE WHEN r.repaired THEN 0 ELSE af.stale END AS stale,
              af.empty,
              CASE WHEN NOT r.repaired THEN af.gaps_since END AS oldest
         FROM pgembed.audit_findings af
         JOIN pgembed.audit_runs r ON r.id = af.run
        WHERE af.pipeline = p.name AND r.finished_at IS NOT NULL AND r.started_at >= p.created_at
        ORDER BY af.run DESC
        LIMIT 1) AS a ON true;

-- Deletes the vectors of orphaned keys, re-checking at delete time that the source row is
-- still gone and the key still not queued (a row re-inserted meanwhile keeps its vectors).
-- Returns how many keys lost their vectors.
CREATE OR REPLACE FUNCTION pgembed.delete_orphans(p pgembed.pipelines, p_keys jsonb[])
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
    n bigint;
BEGIN
    EXECUTE format($q$
        WITH deleted AS (
            DELETE FROM pgembed.%1$I d
             USING pg_catalog.unnest($1) AS k(key)
             WHERE (%2$s) = (%3$s)
               AND NOT EXISTS (SELECT 1 FROM %4$s s WHERE %5$s)
               AND NOT EXISTS (SELECT 1 FROM pgembed.outbox o
                                WHERE o.pipeline = %6$L AND o.key = k.key)
            RETURNING d.chunk_seq)
        SELECT count(*) FROM deleted WHERE chunk_seq = 0$q$,
        p.destination, pgembed.sql_list('d.%1$I', p.key_columns), pgembed.key_casts(p, 'k.key'),
        pgembed.source_name(p), pgembed.sql_list('d.%1$I = s.%1$I', p.key_columns, ' AND '),
        p.name)
       INTO n USING p_keys;
    RETURN n;
END
$$;

-- Audits one pipeline or all, records the run in pgembed.audit_runs and returns it. With
-- p_repair: missing and stale keys are queued (purpose 'repair'; a key queued meanwhile is
-- bumped like a trigger would) and orphaned vectors are deleted. Failed keys are left to a
-- DBA (pgembed failures --retry): the audit does not undo a decision to park a row.
-- The scheduler calls it under an advisory lock; two concurrent runs are still harmless.
CREATE OR REPLACE FUNCTION pgembed.audit(p_repair boolean DEFAULT false, p_pipeline text DEFAULT NULL)
RETURNS pgembed.audit_runs
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    run pgembed.audit_runs;
    p pgembed.pipelines;
    found_ record;
BEGIN
    INSERT INTO pgembed.audit_runs (pipeline, repaired)
    VALUES (p_pipeline, coalesce(p_repair, false))
    RETURNING * INTO run;

    FOR p IN SELECT * FROM pgembed.pipelines_named(p_pipeline) LOOP
        SELECT count(*) FILTER (WHERE g.kind = 'missing') AS missing,
               count(*) FILTER (WHERE g.kind = 'orphaned') AS orphaned,
               count(*) FILTER (WHERE g.kind = 'stale') AS stale,
               count(*) FILTER (WHERE g.kind = 'failed') AS failed,
               count(*) FILTER (WHERE g.kind = 'empty') AS empty,
               min(g.since) FILTER (WHERE g.kind <> 'empty') AS oldest,
               min(g.since) FILTER (WHERE g.kind NOT IN ('failed', 'empty')) AS gaps_since,
               array_agg(g.key) FILTER (WHERE g.kind IN ('missing', 'stale')) AS repairs,
               array_agg(g.key) FILTER (WHERE g.kind = 'orphaned') AS orphans
          INTO found_
          FROM pgembed.gaps(p.name) AS g;

        INSERT INTO pgembed.audit_findings (run, pipeline, missing, orphaned, stale, failed, gaps_since, empty)
        VALUES (run.id, p.name, found_.missing, found_.orphaned, found_.stale, found_.failed,
                found_.gaps_since, found_.empty);
        run.missing := run.missing + found_.missing;
        run.orphaned := run.orphaned + found_.orphaned;
        run.stale := run.stale + found_.stale;
        run.failed := run.failed + found_.failed;
        run.oldest_gap_since := LEAST(run.oldest_gap_since, found_.oldest);
        IF run.repaired AND found_.repairs IS NOT NULL THEN
            run.requeued := run.requeued + pgembed.enqueue(p.name, found_.repairs, 'repair');
        END IF;
        IF run.repaired AND found_.orphans IS NOT NULL THEN
            run.orphans_deleted := run.orphans_deleted + pgembed.delete_orphans(p, found_.orphans);
        END IF;
    END LOOP;

    UPDATE pgembed.audit_runs a
       SET finished_at = clock_timestamp(),
           missing = run.missing, orphaned = run.orphaned, stale = run.stale, failed = run.failed,
           oldest_gap_since = run.oldest_gap_since,
           oldest_gap = run.started_at - run.oldest_gap_since,
           requeued = run.requeued, orphans_deleted = run.orphans_deleted
     WHERE a.id = run.id
    RETURNING * INTO run;
    RETURN run;
END
$$;
