-- description: top tokens by projection of act onto a direction (a JSON list of d numbers)
-- param: run_id VARCHAR
-- param: site VARCHAR
-- param: layer INTEGER
-- param: direction FLOAT[]
-- param: head INTEGER = NULL
-- param: k INTEGER = 20
SELECT prompt_id, position, token, head,
       list_inner_product(act::FLOAT[], $direction::FLOAT[]) AS projection
FROM activations
WHERE run_id = $run_id AND site = $site AND layer = $layer
  AND ($head IS NULL OR head = $head)
ORDER BY projection DESC
LIMIT $k;
