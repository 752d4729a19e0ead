-- attributions: per-token input attributions of committed attribution runs, one row per
-- (run_id, prompt_id, method, position). attribution is the drop in log p(target) when the token's
-- unit is perturbed, per unit (NULL for tokens the tokenizer added, which are not perturbed);
-- window is how many units were perturbed together when it was measured (1: exact), level the round.
CREATE VIEW attributions AS
SELECT run_id, prompt_id, method, position, token_id, token, unit, attribution, "window", level
FROM {{attributions}};
