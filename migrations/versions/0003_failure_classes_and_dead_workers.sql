-- Revision 0003, upgrade: failures say what kind they are, each kind with its retry policy;
-- a dead worker stays in pgembed.workers, shown as dead. The definitions (functions, views,
-- grants) are applied afterwards, from sql/.

-- The kinds of failure and what the worker does with each (see sql/failures.sql). A DBA
-- may change a policy with an UPDATE; the worker reads it at every failure.
CREATE TABLE pgembed.failure_classes (
    class           text PRIMARY KEY,
    -- attempts before the row is parked; NULL: the worker's --max-attempts
    park_after      int CHECK (park_after >= 1),
    -- whether the scheduled retry job re-queues parked rows of this class by itself
    auto_retry      boolean NOT NULL,
    description     text NOT NULL
);

INSERT INTO pgembed.failure_classes (class, park_after, auto_retry, description) VALUES
    ('input_rejected', 1, false,
     'the provider refused the input (HTTP 400/413/422): the same text fails again'),
    ('too_long', 1, false,
     'the input is over the model''s token limit: chunk it (chunk_tokens) or raise max_input_tokens'),
    ('content_error', 1, false,
     'the content expression raised for the row; a change to the row queues it again'),
    ('bad_vector', NULL, true,
     'the provider returned a vector that cannot be stored (NaN, infinite, all zeros, wrong size)'),
    ('provider_unavailable', NULL, true,
     'the provider answered badly or not at all for this input: transient, retried with backoff'),
    ('unknown', NULL, true,
     'anything else, and failures recorded before failures had classes');

ALTER TABLE pgembed.failures
    ADD COLUMN class text NOT NULL DEFAULT 'unknown' REFERENCES pgembed.failure_classes;

-- Failures recorded before this revision: classified from their message where it is one
-- pgembed writes (a chunk's message starts "chunk N: "), else unknown.
UPDATE pgembed.failures f
   SET class = CASE
       WHEN m ~ '^content expression failed: ' THEN 'content_error'
       -- a group the provider refused that was not split down to the bad input: most of it may
       -- be fine, so it is retried like anything else
       WHEN m ~ 'too many rejections in this batch to isolate the bad input' THEN 'unknown'
       WHEN m ~ '^(input|text) has [0-9]+ tokens, (over|more than) the model''s limit'
         OR m ~* '^rejected by the API \(HTTP [0-9]+\):.*(context length|too long|too many tokens|maximum.*tokens)'
            THEN 'too_long'
       WHEN m ~ '^rejected by the API \(HTTP [0-9]+\)' OR m = 'empty text' THEN 'input_rejected'
       WHEN m ~ '^provider returned (a |an |[0-9]+ dimensions)' THEN 'bad_vector'
       WHEN m ~ '^(embedding API returned |provider returned no vector|the request that was embedding)'
            THEN 'provider_unavailable'
       ELSE 'unknown' END
  FROM (SELECT pipeline, key, regexp_replace(error, '^chunk [0-9]+: ', '') AS m FROM pgembed.failures) x
 WHERE x.pipeline = f.pipeline AND x.key = f.key;

CREATE INDEX failures_class ON pgembed.failures (class) WHERE parked_at IS NOT NULL;

-- A worker whose heartbeat stopped is marked dead, no longer deleted.
ALTER TABLE pgembed.workers DROP CONSTRAINT workers_state_check;
ALTER TABLE pgembed.workers
    ADD CONSTRAINT workers_state_check CHECK (state IN ('running', 'stopping', 'dead'));
