-- runs: one row per run in the store, whatever its status ('running', 'committed', 'failed').
-- Provenance comes from runs/<run_id>/run.json, the status from failed.json / commit.json, tags,
-- description and pinned from the annotation events in runs/<run_id>/annotations/.
-- spec, provenance, metadata and timings are JSON text (use ->> to pick fields, e.g. spec->>'$.model').
-- Runs written before a column existed read NULL there (inputs and tags: an empty list).
-- "user" is the older name of owner; store is the store's URI (or its catalog name).
CREATE VIEW runs AS
SELECT run_id, kind, status, model, weight_hash, created_at, committed_at, failed_at, error,
       owner, team, host, package_version, git_commit, git_dirty, spec_hash, dataset_hash, inputs,
       timings, wall_s, tags, description, pinned, store,
       "user", spec, provenance, metadata, n_files, n_activation_rows, n_bytes
FROM {{runs}};
