-- patching: activation-patching scores of committed runs, one row per patched (sweep, layer, position, head).
-- value is the raw metric, normalized is (value - corrupted) / (clean - corrupted).
CREATE VIEW patching AS
SELECT run_id, sweep, method, layer, position, head, value, normalized
FROM {{patching}};
