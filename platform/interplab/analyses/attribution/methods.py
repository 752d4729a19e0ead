"""The two attribution methods over units ``0..n-1``, given a round function ``evaluate``.

``evaluate(variants) -> drops`` runs one round (every variant in one batched forward) and returns
the log-prob drop of removing each variant's units (:meth:`Perturber.attributions`).

* **ItP** (iterative perturbation): each unit alone, one round of n variants.
* **HiPe** (hierarchical perturbation, after Cooper et al. 2021): the first round perturbs windows
  of ``first_window`` units (default half the prompt) that overlap by ``overlap``; each later round
  halves the window and tiles, without overlap, only the units of the windows the previous round
  kept, down to single units. A window's per-unit score is its drop divided by its size; each unit's
  estimate is the lowest score among the windows covering it (a single unit's is exactly its ItP
  attribution). A window is kept, i.e. split further, when its whole drop reaches the threshold and
  exceeds ``min_effect``. The threshold is by default the mid-range of every unit's current estimate,
  ``(max + min) / 2``, as in HiPe: a window whose drop is below it cannot hold a unit whose own drop
  reaches it, as long as the units' drops add up and are not negative (``keep="mean"`` compares the
  per-unit score instead, as HiPe's saliency maps do: cheaper, and it can miss units). Units left
  behind keep their last estimate and the size of the window that gave it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Evaluate = Callable[[Sequence[Sequence[int]]], list[float]]
Keep = Literal["drop", "mean"]


@dataclass(frozen=True)
class UnitScores:
    """Per unit: ``attribution`` (log-prob drop per unit), ``window`` (units perturbed together when
    it was measured: 1 is exact) and ``level`` (the round that measured it, from 0)."""

    attribution: list[float]
    window: list[int]
    level: list[int]


def itp(evaluate: Evaluate, n_units: int) -> UnitScores:
    """Iterative perturbation: one variant per unit, in one round."""
    drops = evaluate([[u] for u in range(n_units)])
    return UnitScores(list(drops), [1] * n_units, [0] * n_units)


def hipe(
    evaluate: Evaluate,
    n_units: int,
    *,
    first_window: int | None = None,
    overlap: float = 0.5,
    threshold: float | None = None,
    min_effect: float = 1e-3,
    keep: Keep = "drop",
) -> UnitScores:
    """Hierarchical perturbation (see the module docstring). ``threshold`` None is the mid-range;
    a number is a fixed drop in nats. ``keep="mean"`` compares a window's per-unit score, not its
    whole drop, with the threshold: fewer windows are kept, and a unit whose window-mates dilute it
    can be missed."""
    if keep not in ("drop", "mean"):
        raise ValueError(f"keep must be 'drop' or 'mean', got {keep!r}")
    if n_units < 1:
        raise ValueError("hipe needs at least one unit")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if first_window is not None and first_window < 1:
        raise ValueError(f"first_window must be >= 1, got {first_window}")
    width = min(n_units, first_window or math.ceil(n_units / 2))
    score = [0.0] * n_units
    window = [n_units] * n_units
    level_of = [0] * n_units
    active = list(range(n_units))
    level = 0
    while active:
        # the first round's windows overlap; later rounds split the kept ones in halves
        stride = max(1, math.ceil(width * (1.0 - overlap))) if level == 0 else width
        windows = [w for run in _runs(active) for w in _tile(run, width, stride)]
        drops = evaluate([list(range(a, b)) for a, b in windows])
        per_unit = [d / (b - a) for (a, b), d in zip(windows, drops)]
        lowest: dict[int, float] = {}
        size: dict[int, int] = {}
        for (a, b), value in zip(windows, per_unit):
            for u in range(a, b):
                if u not in lowest or value < lowest[u]:
                    lowest[u], size[u] = value, b - a
        for u in active:
            score[u], window[u], level_of[u] = lowest[u], size[u], level
        if width == 1:
            break
        cut = threshold if threshold is not None else (max(score) + min(score)) / 2
        tested = drops if keep == "drop" else per_unit
        active = sorted({u for (a, b), d, t in zip(windows, drops, tested) if t >= cut and d > min_effect for u in range(a, b)})
        width = math.ceil(width / 2)
        level += 1
    return UnitScores(score, window, level_of)


def _runs(units: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of consecutive units."""
    runs: list[list[int]] = []
    for u in sorted(units):
        if runs and runs[-1][1] == u:
            runs[-1][1] = u + 1
        else:
            runs.append([u, u + 1])
    return [(a, b) for a, b in runs]


def _tile(run: tuple[int, int], width: int, stride: int) -> list[tuple[int, int]]:
    """Windows of ``width`` every ``stride`` covering ``run``: overlapping ones (``stride < width``)
    with the last ending at the run's end; else a partition whose last window may be shorter."""
    a, b = run
    if b - a <= width:
        return [(a, b)]
    if stride >= width:
        return [(start, min(start + width, b)) for start in range(a, b, width)]
    out = []
    start = a
    while start < b - width:
        out.append((start, start + width))
        start += stride
    out.append((b - width, b))
    return out
