"""The LBFGS probe fit: separable data is classified exactly, and the solution is the regularised
objective's minimum, checked with a hand-written (NumPy) gradient rather than torch's autograd."""

import numpy as np
import pytest
import torch

from interplab.analyses.probes.fit import accuracy, cross_entropy, fit_probe, split_rows


def separable(n: int, d: int, k: int, seed: int, margin: float = 1.0):
    """Points around ``k`` well-separated centres (distance >> spread), with very unequal feature scales."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=gen, dtype=torch.float64) * 10 * margin
    y = torch.arange(n) % k
    x = centres[y] + torch.randn(n, d, generator=gen, dtype=torch.float64)
    x = x * torch.logspace(-2, 2, d, dtype=torch.float64)  # standardisation must cope with 1e4 between scales
    return x, y


def numpy_objective_and_gradient(x, y, weight, bias, mean, scale, l2):
    """J(V, c) = mean CE + l2/2 ||V||^2 in the standardised space, and its gradient, by hand."""
    x, y = x.numpy(), y.numpy()
    v = (weight * scale).numpy()  # W = V / scale
    c = (bias + weight @ mean).numpy()  # b = c - W mean
    z = (x - mean.numpy()) / scale.numpy()
    s = z @ v.T + c
    s = s - s.max(1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(1, keepdims=True)
    n, k = len(y), v.shape[0]
    onehot = np.eye(k)[y]
    value = -np.log(p[np.arange(n), y]).mean() + 0.5 * l2 * (v**2).sum()
    grad_v = (p - onehot).T @ z / n + l2 * v
    grad_c = (p - onehot).mean(0)
    return value, grad_v, grad_c


@pytest.mark.parametrize("k", [2, 4])
def test_separable_data_is_classified_exactly(k):
    x, y = separable(400, 12, k, seed=k)
    train, test = split_rows(y, 0.25, seed=0)
    fit = fit_probe(x[train], y[train], k, l2=1e-3)
    assert accuracy(fit, x[train], y[train]) == 1.0
    assert accuracy(fit, x[test], y[test]) == 1.0
    assert cross_entropy(fit, x[test], y[test]) < 0.1


@pytest.mark.parametrize("k, l2", [(2, 1e-2), (3, 1e-2), (5, 1e-1)])
def test_solution_is_the_regularised_minimum(k, l2):
    gen = torch.Generator().manual_seed(7)
    n, d = 240, 9
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 30, d, dtype=torch.float64) + 3.0
    y = (
        x @ torch.randn(d, k, generator=gen, dtype=torch.float64) + 4 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    ).argmax(1)
    fit = fit_probe(x, y, k, l2=l2)
    value, grad_v, grad_c = numpy_objective_and_gradient(x, y, fit.weight, fit.bias, fit.mean, fit.scale, l2)
    assert value == pytest.approx(fit.objective, rel=1e-10)
    assert np.abs(grad_v).max() < 1e-6 and np.abs(grad_c).max() < 1e-6  # stationary, and J is strictly convex
    # every nearby point is worse (a direct look at the minimum, independent of the gradient formula)
    rng = np.random.default_rng(0)
    for _ in range(5):
        dw = torch.from_numpy(rng.normal(size=tuple(fit.weight.shape))) * 1e-2 / fit.scale
        worse, _, _ = numpy_objective_and_gradient(x, y, fit.weight + dw, fit.bias, fit.mean, fit.scale, l2)
        assert worse > value
    # the raw-space probe gives the standardised-space logits
    z = (x - fit.mean) / fit.scale
    v, c = fit.weight * fit.scale, fit.bias + fit.weight @ fit.mean
    assert torch.allclose(fit.logits(x), z @ v.T + c, atol=1e-9)


def test_constant_features_and_float32_input():
    x, y = separable(120, 6, 3, seed=1)
    x = torch.cat([x, torch.full((120, 2), 5.0, dtype=torch.float64)], 1).float()  # two constant columns
    fit = fit_probe(x, y, 3)
    assert accuracy(fit, x, y) == 1.0
    assert fit.weight[:, -2:].abs().max() == 0  # nothing to learn from a constant


def test_split_is_seeded_stratified_and_disjoint():
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 3 + [3])
    train, test = split_rows(labels, 0.25, seed=3)
    again = split_rows(labels, 0.25, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert not torch.equal(test, split_rows(labels, 0.25, seed=4)[1])
    assert sorted(train.tolist() + test.tolist()) == list(range(len(labels)))
    assert [int((labels[test] == c).sum()) for c in range(4)] == [10, 5, 1, 0]  # the lone class 3 stays in training


@pytest.mark.parametrize(
    "kwargs, message",
    [({"l2": 0.0}, "l2 must be > 0"), ({"n_classes": 1}, "at least 2 classes"), ({"n_classes": 2}, "labels must lie in 0..1")],
)
def test_bad_arguments(kwargs, message):
    x, y = separable(30, 3, 3, seed=0)
    args = {"n_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        fit_probe(x, y, **args)
