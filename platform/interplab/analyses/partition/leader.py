"""Leader clustering under a distance threshold: the streaming build of an exemplar dictionary.

An activation farther than ``threshold`` from every exemplar so far becomes a new exemplar; any
other joins its nearest exemplar's region. With the cosine metric (the default) distances are
``1 - cos(x, e)``, so magnitude is ignored; with the euclidean metric they are ``||x - e||``.

The build is vectorised and still equals the one-row-at-a-time loop exactly: a block of rows is
compared with the current exemplars in one matmul; a row within the threshold of an existing
exemplar can never become one (exemplars only get added, so its nearest distance only falls), and
only the other rows, the *candidates*, are resolved in stream order against the exemplars the same
block created before them: in sub-blocks of ``resolve_rows`` candidates, each first compared (one
matmul) with the exemplars earlier sub-blocks created, then resolved among themselves (a small
candidate-by-candidate distance matrix, then a scan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Metric = Literal["cosine", "euclidean"]
METRICS: tuple[Metric, ...] = ("cosine", "euclidean")


def as_tensor(rows: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Rows as a float32 tensor (a read-only array, e.g. a store window, is copied: torch wants writable memory)."""
    if isinstance(rows, np.ndarray) and not rows.flags.writeable:
        rows = rows.copy()
    return torch.as_tensor(rows).to(torch.float32)


def prepare(x: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Rows as the metric compares them: unit vectors for cosine (a zero row stays zero), else as is."""
    x = x.to(torch.float32)
    if metric == "cosine":
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return x / torch.where(norms > 0, norms, torch.ones_like(norms))
    return x


def pairwise(a: torch.Tensor, b: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Distances ``[n, k]`` between prepared rows ``a [n, d]`` and ``b [k, d]`` (one matmul)."""
    dots = a @ b.T
    if metric == "cosine":
        return 1.0 - dots
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * dots
    return torch.sqrt(torch.clamp(sq, min=0.0))


def nearest(
    x: torch.Tensor, exemplars: torch.Tensor, metric: Metric, max_cells: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prepared row's nearest prepared exemplar: ``(region int64[n], distance float32[n])``.

    Ties go to the lowest region. Rows go in blocks of at most ``max_cells`` distances."""
    n, k = x.shape[0], exemplars.shape[0]
    if k == 0:
        raise ValueError("the dictionary is empty: no exemplar to compare with")
    step = max(1, max_cells // k)
    regions = torch.empty(n, dtype=torch.long)
    dist = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, step):
        block = x[start : start + step]
        d, r = pairwise(block, exemplars, metric).min(dim=1)
        if metric == "euclidean":  # the matmul form loses precision near 0: measure the winner directly
            d = torch.linalg.vector_norm(block - exemplars[r], dim=1)
        regions[start : start + step] = r
        dist[start : start + step] = d
    return regions, dist


class LeaderBuilder:
    """Stream rows in with :meth:`add`; the dictionary grows, the rows are not kept.

    Memory is the dictionary (``[K, d]`` twice: raw and prepared) plus one block."""

    def __init__(self, d: int, threshold: float, metric: Metric = "cosine", capacity: int = 256, resolve_rows: int = 256):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
        if not threshold >= 0:
            raise ValueError(f"threshold must be a non-negative distance, got {threshold!r}")
        self.d, self.threshold, self.metric = d, float(threshold), metric
        self._raw = torch.empty(capacity, d, dtype=torch.float32)
        self._prep = torch.empty(capacity, d, dtype=torch.float32)
        self._origin: list[int] = []  # stream index of each exemplar's row
        self.seen = 0
        self.resolve_rows = resolve_rows  # candidates resolved together (their [c, c] distances at once)

    @property
    def size(self) -> int:
        return len(self._origin)

    @property
    def exemplars(self) -> torch.Tensor:
        """The raw exemplar activations ``[K, d]`` (observed rows), in creation order."""
        return self._raw[: self.size]

    @property
    def prepared(self) -> torch.Tensor:
        return self._prep[: self.size]

    @property
    def origins(self) -> np.ndarray:
        """Stream index (0-based, over every row added) of each exemplar."""
        return np.asarray(self._origin, dtype=np.int64)

    def add(self, block: torch.Tensor | np.ndarray) -> np.ndarray:
        """Stream ``block [n, d]`` in; returns the block-local indices of the rows that became exemplars."""
        x = as_tensor(block)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected rows of width {self.d}, got shape {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        xp = prepare(x, self.metric)
        if self.size:
            candidates = torch.nonzero(self._far(xp, self.prepared)).flatten()
        else:
            candidates = torch.arange(n)
        created: list[np.ndarray] = []
        for start in range(0, len(candidates), self.resolve_rows):
            sub = candidates[start : start + self.resolve_rows]
            if created:  # exemplars this block created in earlier sub-blocks
                fresh = torch.from_numpy(np.concatenate(created))
                sub = sub[self._far(xp[sub], xp[fresh])]
            if len(sub):
                created.append(sub[self._resolve(xp[sub])].numpy())
        new = np.concatenate(created) if created else np.zeros(0, dtype=np.int64)
        self._append(x[new], xp[new], new + self.seen)
        self.seen += n
        return new

    def _resolve(self, cand: torch.Tensor) -> list[int]:
        """Candidates that become exemplars, in stream order: those farther than the threshold from
        every candidate that became one before them (a ``[c, c]`` distance matrix, then a scan)."""
        close = (~self._far_pairs(cand, cand)).numpy()
        covered = np.zeros(len(cand), dtype=bool)
        created = []
        for j in range(len(cand)):
            if not covered[j]:
                created.append(j)
                covered |= close[:, j]
        return created

    def _far_pairs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[n, k]``: is ``d(a_i, b_j) > threshold``. Cosine compares similarities with ``1 - threshold``
        (no distance matrix is formed: one matmul and one comparison)."""
        if self.metric == "cosine":
            return (a @ b.T) < (1.0 - self.threshold)
        return pairwise(a, b, self.metric) > self.threshold

    def _far(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[n]``: is row ``a_i`` farther than the threshold from every row of ``b``."""
        if self.metric == "cosine":
            return (a @ b.T).amax(dim=1) < (1.0 - self.threshold)
        return pairwise(a, b, self.metric).amin(dim=1) > self.threshold

    def _append(self, raw: torch.Tensor, prep: torch.Tensor, origins: np.ndarray) -> None:
        k, m = self.size, raw.shape[0]
        if k + m > self._raw.shape[0]:
            cap = max(2 * self._raw.shape[0], k + m)
            for name in ("_raw", "_prep"):
                grown = torch.empty(cap, self.d, dtype=torch.float32)
                grown[:k] = getattr(self, name)[:k]
                setattr(self, name, grown)
        self._raw[k : k + m] = raw
        self._prep[k : k + m] = prep
        self._origin.extend(int(i) for i in origins)


def build(
    rows: torch.Tensor | np.ndarray, threshold: float, metric: Metric = "cosine", block_rows: int = 4096, resolve_rows: int = 256
) -> LeaderBuilder:
    """The dictionary of ``rows [n, d]`` streamed in blocks of ``block_rows`` (in memory; for tests and notebooks)."""
    x = as_tensor(rows)
    builder = LeaderBuilder(int(x.shape[1]), threshold, metric, resolve_rows=resolve_rows)
    for start in range(0, x.shape[0], block_rows):
        builder.add(x[start : start + block_rows])
    return builder


def percentile_threshold(sample: torch.Tensor | np.ndarray, percentile: float, metric: Metric = "cosine") -> float:
    """The ``percentile`` (0-100) of the distances between distinct rows of ``sample [m, d]``."""
    x = prepare(as_tensor(sample), metric)
    if x.shape[0] < 2:
        raise ValueError("a percentile threshold needs at least 2 sampled rows")
    dist = pairwise(x, x, metric)
    upper = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    values = dist[upper[0], upper[1]].to(torch.float64).numpy()
    return float(np.percentile(values, percentile))


@dataclass(frozen=True)
class ThresholdRule:
    """``threshold`` of a spec: a distance, or ``pN`` (the N-th percentile of sampled pairwise distances)."""

    value: float | None = None
    percentile: float | None = None

    @classmethod
    def parse(cls, raw: float | int | str) -> ThresholdRule:
        if isinstance(raw, bool):
            raise ValueError(f"threshold {raw!r}: give a distance (e.g. 0.3) or a percentile 'p5'")
        if isinstance(raw, (int, float)):
            if raw < 0:
                raise ValueError(f"threshold {raw!r} is negative; a distance is >= 0")
            return cls(value=float(raw))
        text = str(raw).strip().lower()
        if text.startswith("p"):
            try:
                p = float(text[1:])
            except ValueError:
                p = -1.0
            if 0 < p < 100:
                return cls(percentile=p)
        raise ValueError(
            f"threshold {raw!r}: give a distance (e.g. 0.3) or a percentile of pairwise distances ('p1' .. 'p99', e.g. 'p5')"
        )
