-- edges: circuit-discovery edge scores, one row per (run, method, edge) of the full graph.
-- score estimates m(N) - m(N without the edge) (positive: the edge supports the metric);
-- src/dst use MIB names (input, a3.h5, m3; destinations a3.h5<q>, m3, logits); in_circuit marks the
-- run's extracted circuit.
CREATE VIEW edges AS
SELECT run_id, method, src, dst, src_layer, dst_layer, score, in_circuit
FROM {{edges}};
