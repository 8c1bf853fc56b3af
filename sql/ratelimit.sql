-- pgembed shared rate limits: one request and token budget per API key, kept here so that
-- every worker, on every host, spends from the same budget. The tables are in schema.sql;
-- functions and views here are CREATE OR REPLACE.
--
-- A bucket is named by the client from the API's base URL and a fingerprint of its key
-- (the first 16 hex digits of sha256(key)): `key:3f2a9c1b7d4e5f60@https://api.openai.com/v1`.
-- The key itself is never sent here. A bucket without a row in pgembed.rate_limits, or
-- with both budgets NULL, is not limited.
--
-- The guarantee: in ANY window of `per_seconds` seconds, at most `max_requests` requests
-- and `max_tokens` tokens are granted, summed over every worker. One row per bucket holds
-- two mechanisms, updated atomically by pgembed.take_budget; the first enforces that
-- guarantee, the second spreads the budget out:
--
-- * A sliding window kept as 61 slots of per_seconds/60 each (a ring of counts): a grant
--   needs the last 61 slots plus the request within the budget. Any window of per_seconds
--   lies inside 61 consecutive slots, so no window ever exceeds the budget; the price is
--   that sustained throughput is 60/61 of it.
-- * A pacer (a leaky bucket) that spreads the budget out in time: it holds at most
--   `burst_seconds` worth of budget and drains at budget/per_seconds. Without it a backlog
--   would spend a minute's budget in the first second, and APIs that enforce their
--   per-minute limit over shorter periods answer that with 429s.
--
-- A request bigger than the whole budget would never fit: it is granted when it would be
-- alone, i.e. when nothing else was granted in the window and the pacer is empty (the same
-- rule lets a request bigger than the pacer's burst through). It is then the only request
-- of its window, over the budget by itself (the API decides whether to accept it), and the
-- pacer holds what follows back until the average is within the budget again. Nothing
-- deadlocks on it.
--
-- Nothing waits inside PostgreSQL: take_budget locks one row for microseconds and returns
-- how long the caller should sleep before asking again (0: granted, and already counted).
-- There is no queue: under contention, whoever asks first after budget frees up gets it, so
-- a big request can wait longer than small ones. Time is clock_timestamp() of the database
-- server, the one clock every worker shares.
--
-- Headroom: a budget is spent up to `headroom` of itself (0.9 by default: throttle at 90 %),
-- floor(max × headroom) and never less than 1 request, so that what the provider counts a
-- little differently (its own token counts, its clock) still fits under its limit.
--
-- Learning: the provider's answers carry its own view of the limit (OpenAI's
-- x-ratelimit-limit-/remaining-/reset-requests and -tokens). pgembed.learn_rate_limit keeps
-- the last of them on the bucket's row, where every worker sees it: while its reset time
-- has not come, a grant also needs what the API said remained, minus what was granted
-- since, minus a reserve of (1 - headroom) × the API's limit; else the caller waits until
-- that reset. So a budget set higher than the key's true limit slows down to the API's
-- pace instead of collecting 429s. An answer that says more remains than the bucket
-- already thinks (an older request answered late) is ignored until the reset. Requests in
-- flight when the API counted are the error of this estimate: the reserve covers them
-- while fewer are in flight than (1 - headroom) × the API's limit.
--
-- A worker role needs: USAGE ON SCHEMA pgembed, SELECT ON pgembed.rate_limits, SELECT,
-- INSERT, UPDATE ON pgembed.rate_limit_state (take_budget runs with the caller's rights).

-- The argument list gained p_headroom in revision 0007.
DROP FUNCTION IF EXISTS pgembed.set_rate_limit(text, int, bigint, double precision, double precision, text, text);

-- Create or change a budget, with an error a person can act on; returns the row.
CREATE OR REPLACE FUNCTION pgembed.set_rate_limit(
    p_bucket text,
    p_max_requests int,
    p_max_tokens bigint,
    p_per_seconds double precision DEFAULT 60,
    p_burst_seconds double precision DEFAULT 1,
    p_base_url text DEFAULT NULL,
    p_key_fingerprint text DEFAULT NULL,
    p_headroom double precision DEFAULT NULL)
RETURNS pgembed.rate_limits
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r pgembed.rate_limits;
BEGIN
    IF p_bucket IS NULL OR length(p_bucket) NOT BETWEEN 1 AND 500 THEN
        RAISE EXCEPTION 'pgembed: a rate-limit bucket needs a name of 1 to 500 characters';
    END IF;
    IF p_max_requests IS NOT NULL AND p_max_requests <= 0 THEN
        RAISE EXCEPTION 'pgembed: invalid budget for %: max_requests must be > 0, not % (NULL: no limit)',
            p_bucket, p_max_requests;
    END IF;
    IF p_max_tokens IS NOT NULL AND p_max_tokens <= 0 THEN
        RAISE EXCEPTION 'pgembed: invalid budget for %: max_tokens must be > 0, not % (NULL: no limit)',
            p_bucket, p_max_tokens;
    END IF;
    IF p_per_seconds IS NULL OR NOT (p_per_seconds BETWEEN 0.1 AND 86400) THEN
        RAISE EXCEPTION 'pgembed: invalid budget for %: per_seconds must be 0.1 to 86400, not %',
            p_bucket, coalesce(p_per_seconds::text, 'NULL')
            USING HINT = 'A budget of requests per minute has per_seconds = 60.';
    END IF;
    IF p_burst_seconds IS NULL OR NOT (p_burst_seconds > 0 AND p_burst_seconds <= 86400) THEN
        RAISE EXCEPTION 'pgembed: invalid budget for %: burst_seconds must be > 0, not %',
            p_bucket, coalesce(p_burst_seconds::text, 'NULL')
            USING HINT = 'burst_seconds is how many seconds'' worth of budget may be spent at once.';
    END IF;
    IF p_headroom IS NOT NULL AND NOT (p_headroom > 0 AND p_headroom <= 1) THEN
        RAISE EXCEPTION 'pgembed: invalid budget for %: headroom must be > 0 and <= 1, not %',
            p_bucket, p_headroom
            USING HINT = 'headroom is the share of the budget spent: 0.9 throttles at 90 %.';
    END IF;
    IF p_key_fingerprint IS NOT NULL AND p_key_fingerprint !~ '^[0-9a-f]{16}$' THEN
        RAISE EXCEPTION 'pgembed: a key fingerprint is 16 lower-case hex digits (sha256 of the key); '
                        'never store the key itself';
    END IF;
    INSERT INTO pgembed.rate_limits AS l
        (bucket, max_requests, max_tokens, per_seconds, burst_seconds, base_url, key_fingerprint, headroom)
    VALUES (p_bucket, p_max_requests, p_max_tokens, p_per_seconds, p_burst_seconds, p_base_url,
            p_key_fingerprint, coalesce(p_headroom, 0.9))
    ON CONFLICT (bucket) DO UPDATE
        SET max_requests = EXCLUDED.max_requests,
            max_tokens = EXCLUDED.max_tokens,
            per_seconds = EXCLUDED.per_seconds,
            burst_seconds = EXCLUDED.burst_seconds,
            base_url = coalesce(EXCLUDED.base_url, l.base_url),
            key_fingerprint = coalesce(EXCLUDED.key_fingerprint, l.key_fingerprint),
            headroom = coalesce(p_headroom, l.headroom),
            updated_at = pg_catalog.now()
    RETURNING * INTO r;
    RETURN r;
END
$$;

-- Ask for `p_requests` requests carrying `p_tokens` tokens. Returns 0 when granted (and
-- counted), else the seconds to wait before asking again. One row lock, no waiting inside.
CREATE OR REPLACE FUNCTION pgembed.take_budget(p_bucket text, p_requests int, p_tokens bigint)
RETURNS double precision
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n CONSTANT int := 60;      -- slots per window
    m CONSTANT int := 61;      -- slots in the ring: a window spans at most n + 1 of them
    lim pgembed.rate_limits;
    st pgembed.rate_limit_state;
    now_s double precision;
    slot double precision;
    k bigint;
    rs bigint[];
    ts bigint[];
    used bigint;
    need bigint;
    freed bigint;
    budget double precision;
    rate double precision;
    cap double precision;
    rl double precision;
    tl double precision;
    cost double precision;
    lvl double precision;
    w double precision;
    wait double precision := 0;
    max_r double precision;    -- the budget less its headroom
    max_t double precision;
    api_left double precision; -- what the API said remained, less what was granted since
    api_limit double precision;
    api_reset double precision;
BEGIN
    IF p_requests IS NULL OR p_requests < 0 OR p_tokens IS NULL OR p_tokens < 0 THEN
        RAISE EXCEPTION 'pgembed: take_budget needs requests >= 0 and tokens >= 0, not % and %',
            coalesce(p_requests::text, 'NULL'), coalesce(p_tokens::text, 'NULL');
    END IF;
    SELECT * INTO lim FROM pgembed.rate_limits WHERE bucket = p_bucket;
    IF NOT FOUND OR (lim.max_requests IS NULL AND lim.max_tokens IS NULL) THEN
        RETURN 0;
    END IF;
    slot := lim.per_seconds / n;
    -- (greatest ignores a NULL: an unlimited dimension stays NULL through the CASE)
    max_r := CASE WHEN lim.max_requests IS NOT NULL THEN greatest(1, floor(lim.max_requests * lim.headroom)) END;
    max_t := CASE WHEN lim.max_tokens IS NOT NULL THEN greatest(1, floor(lim.max_tokens * lim.headroom)) END;

    SELECT * INTO st FROM pgembed.rate_limit_state WHERE bucket = p_bucket FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        -- an empty ring: slot 0 is long gone, so the first move forward clears everything
        INSERT INTO pgembed.rate_limit_state
            (bucket, slot_seconds, head_slot, request_slots, token_slots, paced_at)
        VALUES (p_bucket, slot, 0, array_fill(0::bigint, ARRAY[m]), array_fill(0::bigint, ARRAY[m]), 0)
        ON CONFLICT (bucket) DO NOTHING;
        SELECT * INTO STRICT st FROM pgembed.rate_limit_state WHERE bucket = p_bucket FOR NO KEY UPDATE;
    END IF;
    -- The time of the grant is read once the row is ours: the lock may have been waited for.
    now_s := extract(epoch FROM pg_catalog.clock_timestamp())::double precision;
    k := floor(now_s / slot)::bigint;
    rs := st.request_slots;
    ts := st.token_slots;

    IF st.slot_seconds <> slot THEN
        -- per_seconds changed: keep what was granted, all of it in the newest slot, so that
        -- it still counts for a whole window (never less than the truth).
        rs := array_fill(0::bigint, ARRAY[m]);
        ts := array_fill(0::bigint, ARRAY[m]);
        rs[(k % m) + 1] := (SELECT coalesce(sum(v), 0) FROM unnest(st.request_slots) v);
        ts[(k % m) + 1] := (SELECT coalesce(sum(v), 0) FROM unnest(st.token_slots) v);
        st.head_slot := k;
        st.slot_seconds := slot;
    END IF;

    -- Move the ring forward to slot k, emptying the slots that left the window.
    IF k > st.head_slot THEN
        IF k - st.head_slot >= m THEN
            rs := array_fill(0::bigint, ARRAY[m]);
            ts := array_fill(0::bigint, ARRAY[m]);
        ELSE
            FOR d IN 1 .. (k - st.head_slot)::int LOOP
                rs[((st.head_slot + d) % m) + 1] := 0;
                ts[((st.head_slot + d) % m) + 1] := 0;
            END LOOP;
        END IF;
        st.head_slot := k;
    ELSE
        k := st.head_slot;  -- the clock stepped back: stay on the newest slot
    END IF;

    -- The pacer drains at budget / per_seconds.
    rl := st.request_level;
    tl := st.token_level;
    IF now_s > st.paced_at THEN
        IF max_r IS NOT NULL THEN
            rl := greatest(0, rl - (now_s - st.paced_at) * max_r / lim.per_seconds);
        END IF;
        IF max_t IS NOT NULL THEN
            tl := greatest(0, tl - (now_s - st.paced_at) * max_t / lim.per_seconds);
        END IF;
        st.paced_at := now_s;
    END IF;

    FOR dim IN 1 .. 2 LOOP
        IF dim = 1 THEN
            budget := max_r; cost := p_requests; lvl := rl;
            used := (SELECT coalesce(sum(v), 0) FROM unnest(rs) v);
            api_left := st.api_requests_remaining - st.api_requests_granted;
            api_limit := st.api_requests_limit; api_reset := st.api_requests_reset_at;
        ELSE
            budget := max_t; cost := p_tokens; lvl := tl;
            used := (SELECT coalesce(sum(v), 0) FROM unnest(ts) v);
            api_left := st.api_tokens_remaining - st.api_tokens_granted;
            api_limit := st.api_tokens_limit; api_reset := st.api_tokens_reset_at;
        END IF;

        -- Learnt: until its reset, what the API said remained, less a reserve of
        -- (1 - headroom) of its limit (a dimension the budget leaves unlimited too).
        IF cost > 0 AND api_left IS NOT NULL AND api_reset > now_s
           AND cost > api_left - ceil((1 - lim.headroom) * coalesce(api_limit, 0)) THEN
            wait := greatest(wait, api_reset - now_s, 0.001);
        END IF;
        CONTINUE WHEN budget IS NULL OR cost = 0;

        -- Window: wait for the oldest slots to leave it until the request fits; a request
        -- bigger than the budget waits until the window is empty.
        need := CASE WHEN cost <= budget THEN used + cost::bigint - budget::bigint ELSE used END;
        IF need > 0 THEN
            freed := 0;
            FOR j IN 0 .. n LOOP
                freed := freed + CASE WHEN dim = 1 THEN rs[((k - n + j) % m) + 1]
                                      ELSE ts[((k - n + j) % m) + 1] END;
                IF freed >= need THEN
                    -- slot k - n + j leaves the window when slot k + 1 + j begins
                    wait := greatest(wait, (k + 1 + j) * slot - now_s, 0.001);
                    EXIT;
                END IF;
            END LOOP;
        END IF;

        -- Pacer: room for the request, or empty for one bigger than the pacer holds.
        rate := budget / lim.per_seconds;
        cap := budget * least(lim.burst_seconds, lim.per_seconds) / lim.per_seconds;
        w := CASE WHEN cost <= cap THEN (lvl + cost - cap) / rate ELSE lvl / rate END;
        IF w > 1e-6 THEN
            wait := greatest(wait, w);
        END IF;
    END LOOP;

    IF wait > 0 THEN
        UPDATE pgembed.rate_limit_state
           SET slot_seconds = st.slot_seconds, head_slot = st.head_slot, request_slots = rs,
               token_slots = ts, request_level = rl, token_level = tl, paced_at = st.paced_at,
               waits = waits + 1
         WHERE bucket = p_bucket;
        RETURN wait;
    END IF;

    rs[(k % m) + 1] := rs[(k % m) + 1] + p_requests;
    ts[(k % m) + 1] := ts[(k % m) + 1] + p_tokens;
    UPDATE pgembed.rate_limit_state
       SET slot_seconds = st.slot_seconds, head_slot = st.head_slot, request_slots = rs,
           token_slots = ts,
           request_level = CASE WHEN lim.max_requests IS NULL THEN 0 ELSE rl + p_requests END,
           token_level = CASE WHEN lim.max_tokens IS NULL THEN 0 ELSE tl + p_tokens END,
           paced_at = st.paced_at,
           granted_requests = granted_requests + p_requests,
           granted_tokens = granted_tokens + p_tokens,
           api_requests_granted = api_requests_granted + p_requests,
           api_tokens_granted = api_tokens_granted + p_tokens,
           last_grant_at = pg_catalog.clock_timestamp()
     WHERE bucket = p_bucket;
    RETURN 0;
END
$$;

-- What the provider's rate-limit headers said in one answer (NULL: not sent): its limits,
-- what remained and in how many seconds that resets (a reset not given: the budget's
-- per_seconds). Kept on the bucket's state row unless it is more hopeful than what the
-- bucket already thinks (see the top of this file). Nothing is kept for a bucket without
-- a budget or that has granted nothing yet; returns whether anything was kept.
CREATE OR REPLACE FUNCTION pgembed.learn_rate_limit(
    p_bucket text,
    p_requests_limit bigint, p_requests_remaining bigint, p_requests_reset double precision,
    p_tokens_limit bigint, p_tokens_remaining bigint, p_tokens_reset double precision)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    st pgembed.rate_limit_state;
    now_s double precision;
    per double precision;
    new_r boolean;
    new_t boolean;
BEGIN
    IF least(p_requests_limit, p_requests_remaining, p_tokens_limit, p_tokens_remaining) < 0
       OR least(p_requests_reset, p_tokens_reset) < 0
       OR NOT (coalesce(p_requests_reset, 0) < 'infinity' AND coalesce(p_tokens_reset, 0) < 'infinity') THEN
        RAISE EXCEPTION 'pgembed: rate-limit headers must be numbers >= 0 (limits %, %; remaining %, %; resets %, %)',
            p_requests_limit, p_tokens_limit, p_requests_remaining, p_tokens_remaining,
            p_requests_reset, p_tokens_reset;
    END IF;
    IF p_requests_remaining IS NULL AND p_tokens_remaining IS NULL THEN
        RETURN false;
    END IF;
    SELECT * INTO st FROM pgembed.rate_limit_state WHERE bucket = p_bucket FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    now_s := extract(epoch FROM pg_catalog.clock_timestamp())::double precision;
    per := st.slot_seconds * 60;
    new_r := p_requests_remaining IS NOT NULL
             AND (st.api_requests_reset_at IS NULL OR st.api_requests_reset_at <= now_s
                  OR p_requests_remaining <= st.api_requests_remaining - st.api_requests_granted);
    new_t := p_tokens_remaining IS NOT NULL
             AND (st.api_tokens_reset_at IS NULL OR st.api_tokens_reset_at <= now_s
                  OR p_tokens_remaining <= st.api_tokens_remaining - st.api_tokens_granted);
    UPDATE pgembed.rate_limit_state
       SET api_requests_limit = CASE WHEN new_r THEN p_requests_limit ELSE api_requests_limit END,
           api_requests_remaining = CASE WHEN new_r THEN p_requests_remaining ELSE api_requests_remaining END,
           api_requests_reset_at = CASE WHEN new_r THEN now_s + coalesce(p_requests_reset, per)
                                        ELSE api_requests_reset_at END,
           api_requests_granted = CASE WHEN new_r THEN 0 ELSE api_requests_granted END,
           api_tokens_limit = CASE WHEN new_t THEN p_tokens_limit ELSE api_tokens_limit END,
           api_tokens_remaining = CASE WHEN new_t THEN p_tokens_remaining ELSE api_tokens_remaining END,
           api_tokens_reset_at = CASE WHEN new_t THEN now_s + coalesce(p_tokens_reset, per)
                                      ELSE api_tokens_reset_at END,
           api_tokens_granted = CASE WHEN new_t THEN 0 ELSE api_tokens_granted END,
           api_seen_at = pg_catalog.clock_timestamp()
     WHERE bucket = p_bucket;
    RETURN new_r OR new_t;
END
$$;

-- What a ring holds for the window that ends now (slots that left it may not be emptied yet).
CREATE OR REPLACE FUNCTION pgembed.rate_limit_window_sum(p_slots bigint[], p_head bigint,
                                                         p_slot_seconds double precision)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(sum(v), 0)::bigint
    FROM unnest(p_slots) WITH ORDINALITY AS u(v, i)
    -- index i holds slot number head - ((head - (i - 1)) % 61); in the window if >= now - 60
    WHERE p_head - ((p_head - (i - 1)) % 61)
          >= floor(extract(epoch FROM clock_timestamp())::double precision / p_slot_seconds)::bigint - 60
$$;

-- Budgets and what is being spent of them, one row per bucket.
CREATE OR REPLACE VIEW pgembed.rate_limit_status AS
SELECT l.bucket,
       l.base_url,
       l.key_fingerprint,
       l.max_requests,
       l.max_tokens,
       l.per_seconds,
       l.burst_seconds,
       coalesce(pgembed.rate_limit_window_sum(s.request_slots, s.head_slot, s.slot_seconds), 0)
           AS window_requests,
       coalesce(pgembed.rate_limit_window_sum(s.token_slots, s.head_slot, s.slot_seconds), 0)
           AS window_tokens,
       coalesce(s.granted_requests, 0) AS granted_requests,
       coalesce(s.granted_tokens, 0) AS granted_tokens,
       coalesce(s.waits, 0) AS waits,
       s.last_grant_at,
       l.updated_at,
       l.headroom,
       -- what the provider's headers said (pgembed.learn_rate_limit): its limits, what
       -- remains of them now by that count (NULL once their reset has come), and when
       s.api_requests_limit,
       CASE WHEN s.api_requests_reset_at > extract(epoch FROM clock_timestamp())
            THEN greatest(0, s.api_requests_remaining - s.api_requests_granted) END AS api_requests_remaining,
       to_timestamp(s.api_requests_reset_at) AS api_requests_reset_at,
       s.api_tokens_limit,
       CASE WHEN s.api_tokens_reset_at > extract(epoch FROM clock_timestamp())
            THEN greatest(0, s.api_tokens_remaining - s.api_tokens_granted) END AS api_tokens_remaining,
       to_timestamp(s.api_tokens_reset_at) AS api_tokens_reset_at,
       s.api_seen_at
FROM pgembed.rate_limits l
LEFT JOIN pgembed.rate_limit_state s ON s.bucket = l.bucket;

-- A bulk request's grant (backfill, repair, migration batches): from a bucket of its own
-- that holds pgembed.bulk_lane.rate_share of the key's budget, then from the key's bucket
-- as any request. So bulk work never takes more than its share, and live requests always
-- have the rest. The share's bucket ('bulk ' and the key's bucket) follows the key's
-- budget at every call. SECURITY DEFINER: it keeps that row, which a worker may not write.
CREATE OR REPLACE FUNCTION pgembed.take_bulk_budget(p_bucket text, p_requests int, p_tokens bigint)
RETURNS double precision
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    share double precision := (SELECT b.rate_share FROM pgembed.bulk_lane b);
    lim pgembed.rate_limits;
    held text := 'bulk ' || left(p_bucket, 495);
    wait double precision;
BEGIN
    SELECT * INTO lim FROM pgembed.rate_limits r WHERE r.bucket = p_bucket;
    IF coalesce(share, 1) < 1 AND (lim.max_requests IS NOT NULL OR lim.max_tokens IS NOT NULL) THEN
        INSERT INTO pgembed.rate_limits AS r (bucket, max_requests, max_tokens, per_seconds, burst_seconds, base_url,
                                              headroom)
        VALUES (held, ceil(lim.max_requests * share)::int, ceil(lim.max_tokens * share)::bigint, lim.per_seconds,
                lim.burst_seconds, lim.base_url, lim.headroom)
        ON CONFLICT (bucket) DO UPDATE
           SET max_requests = excluded.max_requests, max_tokens = excluded.max_tokens,
               per_seconds = excluded.per_seconds, burst_seconds = excluded.burst_seconds,
               headroom = excluded.headroom, updated_at = now()
         WHERE (r.max_requests, r.max_tokens, r.per_seconds, r.burst_seconds, r.headroom)
               IS DISTINCT FROM (excluded.max_requests, excluded.max_tokens, excluded.per_seconds,
                                 excluded.burst_seconds, excluded.headroom);
        wait := pgembed.take_budget(held, p_requests, p_tokens);
        IF wait > 0 THEN
            RETURN wait;
        END IF;
    END IF;
    RETURN pgembed.take_budget(p_bucket, p_requests, p_tokens);
END
$$;

REVOKE ALL ON FUNCTION pgembed.take_bulk_budget(text, int, bigint) FROM PUBLIC;
