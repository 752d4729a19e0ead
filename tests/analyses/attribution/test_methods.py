"""ItP and HiPe as algorithms, on an oracle whose drop is a known function of the removed units."""

import random

import pytest

from interplab.analyses.attribution import hipe, itp


class Oracle:
    """drop(S) = sum of the weights of the units in S; records every round."""

    def __init__(self, weights):
        self.weights = weights
        self.rounds = []

    def __call__(self, variants):
        self.rounds.append([list(v) for v in variants])
        return [sum(self.weights[u] for u in v) for v in variants]

    @property
    def rows(self):
        return sum(len(r) for r in self.rounds)


def weights_for(n, important, value=1.0):
    return [value if u in important else 0.0 for u in range(n)]


def test_itp_is_one_round_of_single_units():
    oracle = Oracle([0.5, 0.0, -0.25, 2.0])
    scores = itp(oracle, 4)
    assert oracle.rounds == [[[0], [1], [2], [3]]]
    assert scores.attribution == [0.5, 0.0, -0.25, 2.0] and scores.window == [1] * 4


def test_hipe_first_round_overlaps_and_covers_every_unit():
    oracle = Oracle(weights_for(20, {7}))
    hipe(oracle, 20)
    first = oracle.rounds[0]
    assert first == [list(range(0, 10)), list(range(5, 15)), list(range(10, 20))]
    for later in oracle.rounds[1:]:  # no overlap after the first round
        units = [u for v in later for u in v]
        assert len(units) == len(set(units))


@pytest.mark.parametrize("n", [16, 50, 100, 256])
@pytest.mark.parametrize("layout", ["one-span", "two-spans", "scattered"])
def test_hipe_finds_every_important_unit(n, layout):
    rng = random.Random(n)
    k = max(1, n // 10)
    if layout == "one-span":
        start = rng.randrange(0, n - k)
        important = set(range(start, start + k))
    elif layout == "two-spans":
        half = k // 2
        a, b = rng.randrange(0, n // 2 - half), rng.randrange(n // 2, n - (k - half))
        important = set(range(a, a + half)) | set(range(b, b + k - half))
    else:
        important = set(rng.sample(range(n), k))
    oracle = Oracle(weights_for(n, important))
    scores = hipe(oracle, n)
    assert {u for u, v in enumerate(scores.attribution) if v > 0.5} == important
    assert all(scores.window[u] == 1 and scores.attribution[u] == 1.0 for u in important)
    rows = oracle.rows + 1  # and the unperturbed row
    if (layout == "one-span" and n >= 50) or (layout == "two-spans" and n >= 100):
        assert rows <= 0.5 * n
    else:  # scattered units cost more (every one needs its own path down), still fewer than ItP's n + 1
        assert rows <= n


def test_hipe_stops_when_nothing_matters():
    oracle = Oracle([0.0] * 64)
    scores = hipe(oracle, 64)
    assert len(oracle.rounds) == 1 and scores.attribution == [0.0] * 64


def test_hipe_fixed_threshold_prunes_weak_units():
    weights = weights_for(40, {5}, 1.0)
    weights[30] = 0.2
    strong = hipe(Oracle(weights), 40, threshold=0.5)
    assert strong.window[5] == 1 and strong.window[30] > 1  # 30's window never reached 0.5
    both = hipe(Oracle(weights), 40, threshold=0.1)
    assert both.window[30] == 1 and both.attribution[30] == pytest.approx(0.2)


@pytest.mark.parametrize("bad", [{"overlap": 1.0}, {"overlap": -0.1}, {"first_window": 0}])
def test_hipe_refuses_bad_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        hipe(Oracle([0.0] * 8), 8, **bad)


def test_keep_mean_prunes_more_and_can_miss_a_diluted_unit():
    """Unit 30 (0.6 nats) shares its first window with nothing else: its per-unit score (0.03) is under
    the mid-range (0.05) while the window's whole drop is not, so keep='mean' drops it, keep='drop' not."""
    weights = weights_for(40, {5, 6})
    weights[30] = 0.6
    by_drop, by_mean = Oracle(weights), Oracle(weights)
    drop = hipe(by_drop, 40)
    mean = hipe(by_mean, 40, keep="mean")
    assert drop.window[30] == 1 and drop.attribution[30] == pytest.approx(0.6)
    assert mean.window[30] == 20 and mean.attribution[30] == pytest.approx(0.03)
    assert mean.window[5] == mean.window[6] == 1
    assert by_mean.rows < by_drop.rows
