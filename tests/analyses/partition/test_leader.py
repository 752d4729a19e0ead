"""The leader build: known clusters recovered, the vectorised build equal to the plain loop, thresholds."""

import numpy as np
import pytest
import torch

from interplab.analyses.partition import Dictionary, ThresholdRule, build, percentile_threshold
from interplab.analyses.partition.assign import merge_top, top_rows
from tests.analyses.partition.reference import clusters, distance, plain_assign, plain_leader


def purity(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of rows whose region's majority true label is their own."""
    hits = 0
    for region in np.unique(found):
        hits += np.bincount(truth[found == region]).max()
    return hits / len(truth)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_k_known_centres_give_k_pure_regions(metric):
    k = 12
    points, labels = clusters(k, 200, 64, spread=0.15, seed=1)
    if metric == "euclidean":
        points = points / np.linalg.norm(points, axis=1, keepdims=True)  # centres on the unit sphere
    x = torch.from_numpy(points)
    within = max(distance(points[i], points[j], metric) for i, j in zip(*np.nonzero(labels[:, None] == labels[None, :300])) if i != j)
    between = min(distance(points[i], points[j], metric) for i in range(300) for j in range(300) if labels[i] != labels[j])
    assert within < between  # the data has a gap to put the threshold in
    threshold = (within + between) / 2
    builder = build(x, threshold, metric, block_rows=128)
    dictionary = Dictionary(builder.exemplars.numpy(), metric, threshold)
    region, _ = dictionary.nearest(points)
    assert builder.size == k
    assert purity(region, labels) >= 0.99
    assert len(np.unique(labels[builder.origins])) == k  # one exemplar per centre


@pytest.mark.parametrize("metric, threshold", [("cosine", 0.75), ("cosine", 0.95), ("euclidean", 4.0), ("euclidean", 5.0)])
@pytest.mark.parametrize("block_rows, resolve_rows", [(1, 256), (7, 2), (64, 256), (1000, 5), (1000, 256)])
def test_vectorised_build_equals_the_plain_loop(metric, threshold, block_rows, resolve_rows):
    rows = np.random.default_rng(3).normal(size=(400, 16)).astype(np.float32)
    expected = plain_leader(rows, threshold, metric)
    builder = build(rows, threshold, metric, block_rows=block_rows, resolve_rows=resolve_rows)
    assert 5 < len(expected) < 390  # neither trivial case
    assert builder.origins.tolist() == expected
    np.testing.assert_array_equal(builder.exemplars.numpy(), rows[expected])


def test_assignment_equals_the_plain_loop():
    rows = np.random.default_rng(4).normal(size=(300, 8)).astype(np.float32)
    for metric, threshold in (("cosine", 0.6), ("euclidean", 3.0)):
        builder = build(rows, threshold, metric, block_rows=50)
        region, dist = Dictionary(builder.exemplars.numpy(), metric, threshold).nearest(rows)
        ref_region, ref_dist = plain_assign(rows, builder.exemplars.numpy(), metric)
        np.testing.assert_array_equal(region, ref_region)
        np.testing.assert_allclose(dist, ref_dist, atol=2e-5)
        assert (dist <= threshold + 1e-6).all()  # every row is within the threshold of some exemplar


def test_zero_rows_have_no_direction_under_cosine():
    """A zero row is at cosine distance 1 from everything (cos = 0), as in the plain loop."""
    rows = np.random.default_rng(7).normal(size=(40, 4)).astype(np.float32)
    rows[::5] = 0.0
    for threshold in (0.5, 1.0):
        assert build(rows, threshold, "cosine", block_rows=9).origins.tolist() == plain_leader(rows, threshold, "cosine")


def test_percentile_threshold_is_numpys_percentile_of_pairwise_distances():
    sample = np.random.default_rng(5).normal(size=(60, 10)).astype(np.float32)
    pairs = [distance(sample[i], sample[j], "cosine") for i in range(60) for j in range(i + 1, 60)]
    for p in (1, 5, 50):
        assert percentile_threshold(sample, p, "cosine") == pytest.approx(np.percentile(pairs, p), abs=1e-5)


@pytest.mark.parametrize("raw, value, percentile", [(0.3, 0.3, None), (1, 1.0, None), ("p5", None, 5.0), ("P0.5", None, 0.5)])
def test_threshold_rule(raw, value, percentile):
    rule = ThresholdRule.parse(raw)
    assert (rule.value, rule.percentile) == (value, percentile)


@pytest.mark.parametrize("raw", [-0.1, "p0", "p100", "5", "q5", True])
def test_bad_threshold_rules(raw):
    with pytest.raises(ValueError, match="threshold"):
        ThresholdRule.parse(raw)


def test_top_members_merge_equals_a_global_sort():
    rng = np.random.default_rng(6)
    import pyarrow as pa

    region = rng.integers(0, 5, size=200)
    dist = rng.random(200).astype(np.float32)
    stream = np.arange(200)
    table = pa.table({"region": region.astype(np.int32), "distance": dist, "stream": stream})
    parts = [table.slice(0, 70), table.slice(70, 60), table.slice(130)]
    parts = [p.take(pa.array(top_rows(p["region"].to_numpy(), p["distance"].to_numpy(), p["stream"].to_numpy(), 3))) for p in parts]
    merged = merge_top(parts, 3)
    for r in range(5):
        expected = sorted(stream[region == r], key=lambda i: (dist[i], i))[:3]
        got = [row["stream"] for row in merged.to_pylist() if row["region"] == r]
        assert got == expected
        assert [row["rank"] for row in merged.to_pylist() if row["region"] == r] == [0, 1, 2]
