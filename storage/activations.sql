-- activations: one row per captured (run_id, prompt_id, position, site, layer, head) of committed runs.
-- act is FLOAT[d] (fixed size) when every committed activation has the same width d, usable directly
-- with array_cosine_similarity / array_inner_product. When widths differ (e.g. resid 576 and z 64),
-- act is FLOAT[] here; use the per-width views activations_d<d> (FLOAT[d]) or list_* functions.
-- run_id, site and layer are partition columns: filters on them skip whole files.
CREATE VIEW activations AS
SELECT run_id, prompt_id, position, token_id, token, site, layer, head, act
FROM {{activations}};
