-- exemplars: the dictionary of each committed partition run, one row per region. vector is the exemplar (the
-- observed activation that anchors the region; a direction for ablation or steering: {run_id, region}); the
-- row it came from is (source_run, prompt_id, position, head, token). n_members, mean_distance and
-- max_distance describe the region under the final nearest-exemplar assignment.
CREATE VIEW exemplars AS
SELECT run_id, region, source_run, prompt_id, position, head, token, n_members, mean_distance, max_distance, vector
FROM {{exemplars}};
