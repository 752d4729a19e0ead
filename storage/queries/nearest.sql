-- description: nearest neighbours (cosine similarity) of a vector among a run's site activations
-- param: run_id VARCHAR
-- param: site VARCHAR
-- param: layer INTEGER
-- param: vector FLOAT[]
-- param: head INTEGER = NULL
-- param: k INTEGER = 10
SELECT prompt_id, position, token, head,
       list_cosine_similarity(act::FLOAT[], $vector::FLOAT[]) AS similarity
FROM activations
WHERE run_id = $run_id AND site = $site AND layer = $layer
  AND ($head IS NULL OR head = $head)
ORDER BY similarity DESC
LIMIT $k;
