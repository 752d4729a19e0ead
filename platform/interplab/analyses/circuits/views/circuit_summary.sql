-- circuit_summary: one row per (run, method): scoring seconds, circuit size and metric, MIB CPR / CMD.
CREATE VIEW circuit_summary AS
SELECT run_id, method, seconds, n_graph_edges, circuit_edges, clean, corrupted, circuit_value, cpr, cmd
FROM {{circuit_summary}};
