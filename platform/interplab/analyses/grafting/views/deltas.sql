-- deltas: weight deltas of committed grafting runs. Each row names one safetensors file (path, relative to the
-- store root; sha256 and bytes of the file). delta: W_F-theta, W_F_ImplF-W_F, W_F_prime-theta, W_ImplF-theta.
-- Load one with interplab.analyses.grafting.deltas.load_delta(store, run_id, name).
CREATE VIEW deltas AS
SELECT run_id, name, experiment, delta, path, bytes, sha256, n_tensors, n_params, dtype, norm,
       lr, epochs, batch_size, seed
FROM {{deltas}};
