-- attribution_summary: one row per (run_id, prompt_id, method) of committed attribution runs: the
-- unperturbed log p(target), and the cost: forwards (rows run, the unperturbed one included),
-- passes (batched forward calls), rounds (HiPe levels; ItP has one) and seconds.
CREATE VIEW attribution_summary AS
SELECT run_id, prompt_id, method, prompt, target, perturbation, n_tokens, n_units, base_logprob,
       forwards, passes, rounds, seconds
FROM {{attribution_summary}};
