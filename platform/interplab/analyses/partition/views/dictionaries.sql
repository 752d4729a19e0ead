-- dictionaries: one row per committed partition run: the site, metric and threshold (threshold_rule as written:
-- a distance, or pN = the N-th percentile of sampled pairwise distances), the dictionary size n_regions over
-- n_rows activation rows of width d, the runs it read (inputs), and the build and assignment wall times.
CREATE VIEW dictionaries AS
SELECT run_id, site, metric, threshold, threshold_rule, percentile, n_rows, n_regions, d, inputs,
       build_seconds, assign_seconds
FROM {{dictionaries}};
