-- Revision 0004, upgrade: halfvec and quantization. The definitions (functions, views,
-- grants) and every pipeline's generated code are applied afterwards, from sql/.

-- How a pipeline stores its vectors: 'vector' (4-byte floats, indexes up to 2,000
-- dimensions) or 'halfvec' (2-byte floats, indexes up to 4,000). The pipelines that exist
-- keep 'vector'.
ALTER TABLE pgembed.pipelines ADD COLUMN storage text NOT NULL DEFAULT 'vector'
    CHECK (storage IN ('vector', 'halfvec'));
-- 'binary': the HNSW index holds binary_quantize(embedding) (one bit a dimension); a search
-- reads `rerank` times as many candidates by Hamming distance and re-ranks them by the
-- stored vectors. 'none': the index holds the vectors themselves.
ALTER TABLE pgembed.pipelines ADD COLUMN quantization text NOT NULL DEFAULT 'none'
    CHECK (quantization IN ('none', 'binary'));
ALTER TABLE pgembed.pipelines ADD COLUMN rerank int CHECK (rerank BETWEEN 1 AND 100);
ALTER TABLE pgembed.pipelines ADD CONSTRAINT pipelines_quantization_index
    CHECK (quantization = 'none' OR index_type = 'hnsw');
ALTER TABLE pgembed.pipelines ADD CONSTRAINT pipelines_quantization_rerank
    CHECK ((quantization = 'none') = (rerank IS NULL));
