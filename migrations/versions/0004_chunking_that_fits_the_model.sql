-- Revision 0003, upgrade: chunking that fits the model. The definitions (functions, views,
-- grants) and every pipeline's generated code are applied afterwards, from sql/.

-- How a model counts tokens: 'cl100k' (OpenAI's embedding models), 'model' (a local model's
-- own tokenizer), NULL (not declared: an OpenAI-compatible server's model, counted in cl100k
-- with a quarter of its window kept free).
ALTER TABLE pgembed.models ADD COLUMN tokenizer text CHECK (tokenizer IN ('cl100k', 'model'));
UPDATE pgembed.models SET tokenizer = 'cl100k'
 WHERE model IN ('openai:text-embedding-3-small', 'openai:text-embedding-3-large', 'openai:text-embedding-ada-002');
UPDATE pgembed.models SET tokenizer = 'model' WHERE model LIKE 'local:%';

-- A pipeline's chunking. The pipelines that exist keep their behaviour: chunk_tokens 0 was
-- "no chunking, a row too long for the model fails", N > 0 was cl100k windows of N tokens.
ALTER TABLE pgembed.pipelines ADD COLUMN chunking text NOT NULL DEFAULT 'none'
    CHECK (chunking IN ('recursive', 'markdown', 'tokens', 'truncate', 'none'));
UPDATE pgembed.pipelines SET chunking = 'tokens' WHERE chunk_tokens > 0;
ALTER TABLE pgembed.pipelines ADD CONSTRAINT pipelines_chunking_size
    CHECK ((chunking = 'none') = (chunk_tokens = 0));
-- An expression embedded at the head of every chunk of a row (the title, say), as given; the
-- bound content then carries it (see pgembed.prefixed_content).
ALTER TABLE pgembed.pipelines ADD COLUMN chunk_prefix text;

-- Every destination row says whether its chunk is the start of a longer text (chunking
-- 'truncate'). The stores' signatures change with it: the old ones go, refresh.sql
-- generates the new.
DO $$
DECLARE
    p record;
BEGIN
    FOR p IN SELECT id, destination FROM pgembed.pipelines LOOP
        IF to_regclass(format('pgembed.%I', p.destination)) IS NOT NULL THEN
            EXECUTE format('ALTER TABLE pgembed.%I ADD COLUMN truncated boolean NOT NULL DEFAULT false',
                           p.destination);
        END IF;
    END LOOP;
END
$$;
