-- regions: every activation row a committed partition run read, with its region (nearest exemplar) and the
-- distance to it (the nearest-exemplar distance; high = far from everything the dictionary has seen).
CREATE VIEW regions AS
SELECT run_id, source_run, prompt_id, position, head, token, region, distance
FROM {{regions}};
