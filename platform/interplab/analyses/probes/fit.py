"""Multinomial logistic-regression probes, fitted with ``torch.optim.LBFGS``.

A probe for ``K`` classes maps an activation ``x`` (``d`` numbers) to class scores ``W x + b``
(``W``: ``[K, d]``, ``b``: ``[K]``). Features are standardised first with the training rows' mean
``mu`` and standard deviation ``sigma`` (``z = (x - mu) / sigma``; residual streams have a few
dimensions hundreds of times larger than the rest, which would otherwise dominate both the
penalty and LBFGS's curvature estimate). In the standardised space the fit minimises

    J(V, c) = mean_i CE(softmax(V z_i + c), y_i) + (l2 / 2) * ||V||_F^2

(the bias is not penalised), which is strictly convex in ``V`` for ``l2 > 0``, so LBFGS's
stationary point is the unique minimum. The stored probe is mapped back to raw activations:
``W = V / sigma`` and ``b = c - W mu``, so ``W x + b = V z + c`` and row ``W[k]`` is a direction
in the model's own activation space (usable for steering or ablation).

With ``l2 = 1 / (C n)`` this is scikit-learn's ``LogisticRegression(C=C)`` (multinomial, lbfgs) on
the standardised features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Problems smaller than this many multiply-adds per pass run on one intra-op thread: their matmuls
# are too small to gain from threads, and on a loaded machine OpenMP's waiting threads made a
# 192 x 576 x 65 fit 20x slower with 2 threads than with 1 (bench/probes_train.py).
SINGLE_THREAD_WORK = 50_000_000


@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe, in raw activation space: ``logits = x @ weight.T + bias``.

    Attributes:
        weight: ``Float[K, d]`` one row per class (the class's direction).
        bias: ``Float[K]``.
        mean, scale: ``Float[d]`` the standardisation the fit used (``z = (x - mean) / scale``).
        objective: the regularised objective ``J`` at the solution (standardised space).
        grad_norm: the max-norm of ``J``'s gradient at the solution.
        iterations: LBFGS iterations used.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    objective: float
    grad_norm: float
    iterations: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``Float[n, K]`` class scores of activations ``x`` (``Float[n, d]``)."""
        return x.to(self.weight.dtype) @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``Long[n]`` the most likely class of each row."""
        return self.logits(x).argmax(-1)


def standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, scale)`` of the columns of ``x`` (``Float[n, d]``); constant columns get scale 1."""
    mean = x.mean(0)
    scale = x.std(0, correction=0)
    return mean, torch.where(scale > 1e-12 * scale.max().clamp_min(1e-30), scale, torch.ones_like(scale))


def fit_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = 500,
    tol: float = 1e-7,
    standardize: bool = True,
) -> ProbeFit:
    """Fit a ``n_classes``-way logistic-regression probe on ``x`` (``Float[n, d]``), ``y`` (``Long[n]``).

    ``l2`` is the weight-decay strength on the standardised weights (> 0); ``max_iter`` bounds the
    LBFGS iterations and ``tol`` is its gradient tolerance. Computed in float64.
    """
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_probe needs x [n, d] and y [n]; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("fit_probe needs at least one training row")
    if n_classes < 2:
        raise ValueError(f"a probe needs at least 2 classes, got {n_classes}")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (it makes the problem strictly convex), got {l2}")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}")
    x64 = x.detach().to(torch.float64)
    y = y.detach().long()
    if standardize:
        mean, scale = standardizer(x64)
    else:
        mean, scale = torch.zeros(x64.shape[1], dtype=torch.float64), torch.ones(x64.shape[1], dtype=torch.float64)
    z = (x64 - mean) / scale
    v = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [v, c],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(z @ v.T + c, y) + 0.5 * l2 * (v * v).sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with _threads(1 if z.shape[0] * z.shape[1] * n_classes < SINGLE_THREAD_WORK else None):
        optimizer.step(closure)
        loss = closure()
    iterations = int(optimizer.state[v].get("n_iter", 0))
    grad_norm = max(float(v.grad.abs().max()), float(c.grad.abs().max()))  # type: ignore[union-attr]
    with torch.no_grad():
        weight = v / scale
        bias = c - weight @ mean
    return ProbeFit(weight.detach(), bias.detach(), mean, scale, float(loss.detach()), grad_norm, iterations)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` intra-op threads (None: leave the setting alone); restored afterwards."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def accuracy(fit: ProbeFit, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of ``x`` whose predicted class is ``y`` (NaN for no rows)."""
    if y.numel() == 0:
        return float("nan")
    return float((fit.predict(x) == y).double().mean())


def cross_entropy(fit: ProbeFit, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy (nats) of the probe on ``x``/``y``, without the penalty (NaN for no rows)."""
    if y.numel() == 0:
        return float("nan")
    return float(torch.nn.functional.cross_entropy(fit.logits(x), y))


def split_rows(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` row indices: a seeded split, stratified by class.

    Each class puts ``round(test_fraction * count)`` of its rows in the test set but keeps at least
    one in training (a class seen only at test time could never be predicted)."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == cls).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n_test = min(round(test_fraction * len(rows)), len(rows) - 1)
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
