-- faithfulness: f(C) = (m(C) - m(empty)) / (m(full) - m(empty)) of circuits of n_edges top edges
-- (absolute: ranked by |score|, else by signed score); kept = edges left after pruning.
CREATE VIEW faithfulness AS
SELECT run_id, method, rule, absolute, n_edges, fraction, kept, value, faithfulness
FROM {{faithfulness}};
