-- grafting: ranks of the correct answer among its options, per finetuned / grafted variant and eval set.
-- experiment: grafting | freezing | ordering; variant: base, W_F, W_F_ImplF, W_F_prime, W_ImplF, graft, control
-- (grafting), train / keep (freezing), joint / facts_first / implications_first (ordering); layers: all | early | late;
-- epoch: ordering phase-2 epoch (0 = before it), NULL elsewhere; eval_set: F, ImplF, F_prime, ImplF_prime, F_new, ImplF_new.
CREATE VIEW grafting AS
SELECT run_id, experiment, variant, layers, epoch, eval_set, mean_rank, mean_logprob, n, n_options,
       lr, epochs, batch_size, seed
FROM {{grafting}};
