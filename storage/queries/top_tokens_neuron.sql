-- description: top activating tokens for one neuron (one coordinate of act) of a run's site
-- param: run_id VARCHAR
-- param: site VARCHAR
-- param: layer INTEGER
-- param: neuron INTEGER
-- param: head INTEGER = NULL
-- param: k INTEGER = 20
SELECT prompt_id, position, token, head, act[$neuron + 1] AS activation
FROM activations
WHERE run_id = $run_id AND site = $site AND layer = $layer
  AND ($head IS NULL OR head = $head)
ORDER BY activation DESC
LIMIT $k;
