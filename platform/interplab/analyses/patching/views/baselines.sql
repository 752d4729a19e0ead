-- baselines: named scalar reference numbers of committed runs (e.g. the clean and corrupted metric of a sweep).
CREATE VIEW baselines AS
SELECT run_id, sweep, name, value
FROM {{baselines}};
