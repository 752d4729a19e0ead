-- circuits: the edges of each method's extracted circuit (rule: topn | greedy | threshold | acdc).
CREATE VIEW circuits AS
SELECT run_id, method, rule, src, dst
FROM {{circuits}};
