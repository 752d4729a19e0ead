-- region_members: the top_k rows of each region nearest its exemplar (rank 0 = nearest; the exemplar itself,
-- at distance 0), with context (tokens around the member, the member in [brackets]) and the whole prompt.
CREATE VIEW region_members AS
SELECT run_id, region, rank, source_run, prompt_id, position, head, token, distance, context, prompt
FROM {{region_members}};
