"""Independent references: the leader clustering loop one row at a time, in float64 numpy."""

from __future__ import annotations

import numpy as np


def distance(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if metric == "cosine":
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na == 0 or nb == 0:
            return 1.0
        return float(1.0 - a @ b / (na * nb))
    return float(np.linalg.norm(a - b))


def plain_leader(rows: np.ndarray, threshold: float, metric: str) -> list[int]:
    """Stream indices of the exemplars: a row farther than ``threshold`` from every exemplar so far becomes one."""
    exemplars: list[int] = []
    for i, row in enumerate(rows):
        nearest = min((distance(row, rows[e], metric) for e in exemplars), default=None)
        if nearest is None or nearest > threshold:
            exemplars.append(i)
    return exemplars


def plain_assign(rows: np.ndarray, exemplars: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Nearest exemplar (lowest index on ties) and its distance, row by row."""
    regions, dists = [], []
    for row in rows:
        d = [distance(row, e, metric) for e in exemplars]
        regions.append(int(np.argmin(d)))
        dists.append(min(d))
    return np.array(regions), np.array(dists)


def clusters(k: int, n_per: int, d: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` random unit centres in ``d`` dims, ``n_per`` points around each (scaled randomly:
    cosine ignores magnitude), shuffled; returns (points, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), n_per)
    noise = rng.normal(size=(k * n_per, d)) * spread / np.sqrt(d)
    scale = rng.uniform(0.5, 3.0, size=(k * n_per, 1))
    points = (centres[labels] + noise) * scale
    order = rng.permutation(len(labels))
    return points[order].astype(np.float32), labels[order]
