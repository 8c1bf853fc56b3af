-- Revision 0006, upgrade: late chunking, indexes that wait for their data, stable search
-- names, evaluation sets and runs, model migrations and the live lane. The definitions
-- (functions, views, grants) and every pipeline's generated code are applied afterwards,
-- from sql/.

-- ---------------------------------------------------------------------------------------
-- Late chunking
-- ---------------------------------------------------------------------------------------

-- (none yet)

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
