-- prompts: the prompts of committed capture runs, one row per (run_id, prompt_id).
CREATE VIEW prompts AS
SELECT run_id, prompt_id, n_tokens, token_ids, tokens
FROM {{prompts}};
