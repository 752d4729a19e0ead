-- probe_weights: the fitted probes of committed probe runs, one row per (site, layer, class).
-- weight is the class's direction in raw activation space (list of d floats); class logit = weight . x + bias.
-- Two classes: weight[class 1] - weight[class 0] is the decision direction.
CREATE VIEW probe_weights AS
SELECT run_id, site, layer, class, class_index, weight, bias, norm
FROM {{probe_weights}};
