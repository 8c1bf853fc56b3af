-- Revision 0006, upgrade: late chunking, indexes that wait for their data, stable search
-- names, evaluation sets and runs, model migrations and the live lane. The definitions
-- (functions, views, grants) and every pipeline's generated code are applied afterwards,
-- from sql/.

-- ---------------------------------------------------------------------------------------
-- Late chunking
-- ---------------------------------------------------------------------------------------

-- Late chunking: the model reads the whole document (window by window) and each chunk's
-- vector is the mean of its own tokens' states, so it carries its document's context. Only
-- a local model gives pgembed those states, and only chunking that makes several chunks of
-- a document has anything to pool. The pipelines that exist keep plain chunking.
ALTER TABLE pgembed.pipelines ADD COLUMN late_chunking boolean NOT NULL DEFAULT false;
ALTER TABLE pgembed.pipelines ADD CONSTRAINT pipelines_late_chunking
    CHECK (NOT late_chunking OR (starts_with(model, 'local:') AND chunking NOT IN ('none', 'truncate')));

-- ---------------------------------------------------------------------------------------
-- Indexes that wait for their data
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- Stable search names and evaluation
-- ---------------------------------------------------------------------------------------

-- (none yet)

-- ---------------------------------------------------------------------------------------
-- Model migrations and the live lane
-- ---------------------------------------------------------------------------------------

-- (none yet)
