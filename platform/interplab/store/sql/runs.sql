-- runs: one row per run in the store, whatever its status ('running', 'committed', 'failed').
-- Provenance comes from runs/<run_id>/run.json, the status from failed.json / commit.json.
-- spec, provenance and metadata are JSON text (use ->> to pick fields, e.g. spec->>'$.model').
CREATE VIEW runs AS
SELECT run_id, kind, status, model, weight_hash, created_at, committed_at, failed_at, error,
       "user", host, package_version, spec, provenance, metadata, n_files, n_activation_rows
FROM {{runs}};
