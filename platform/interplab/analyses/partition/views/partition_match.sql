-- partition_match: a partition run's dictionary (side 'b') matched against an earlier one (other_run, side 'a')
-- by cosine similarity of exemplars. b rows: preserved (its nearest a exemplar is at least match_similarity
-- similar) or new; a rows: preserved or vanished (no b region reaches it). mutual: each other's nearest.
CREATE VIEW partition_match AS
SELECT run_id, dictionary, other_run, region, match_region, similarity, mutual, status
FROM {{partition_match}};
