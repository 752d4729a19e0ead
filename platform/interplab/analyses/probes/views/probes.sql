-- probes: linear-probe accuracy of committed probe runs, one row per (site, layer).
-- train/test accuracy on a seeded stratified split; majority: test accuracy of always answering the most
-- frequent training class (the floor); losses are mean cross-entropy in nats.
CREATE VIEW probes AS
SELECT run_id, site, layer, position, label, n_classes, d, n_train, n_test, train_accuracy, test_accuracy,
       train_loss, test_loss, majority, l2, iterations, grad_norm
FROM {{probes}};
