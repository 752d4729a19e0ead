-- description: a run's patching heatmap for one sweep: layer x position (x head) -> normalized score
-- param: run_id VARCHAR
-- param: sweep VARCHAR
-- param: method VARCHAR = NULL
SELECT layer, position, head, method, value, normalized
FROM patching
WHERE run_id = $run_id AND sweep = $sweep AND ($method IS NULL OR method = $method)
ORDER BY method, layer, position, head NULLS FIRST;
