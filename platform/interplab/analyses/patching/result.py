"""Patching results: one row per (sweep, method, patch), baselines, and exact-vs-AtP agreement."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PatchingResult:
    """``rows``: dicts with ``sweep, method, layer, position, head, value, normalized``.

    ``value`` is the metric averaged over prompts for that patch, in the metric's units;
    ``normalized`` is ``(value - corrupted) / (clean - corrupted)``. ``baselines`` holds the clean and
    corrupted metric (``clean``, ``corrupted``) and, when both methods ran, ``correlation`` holds the
    Pearson correlation of exact and AtP values per sweep. ``rows_run`` counts the (patch, prompt)
    rows exact patching computed, ``rows_unchanged`` those it did not need to (the patch wrote the
    value already there, so the row is the target run).
    """

    rows: list[dict] = field(default_factory=list)
    baselines: dict[str, float] = field(default_factory=dict)
    correlation: dict[str, float] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    rows_run: int = 0
    rows_unchanged: int = 0

    def values(self, sweep: str, method: str = "exact", key: str = "value") -> torch.Tensor:
        """The sweep's values as a dense tensor over its axes (layer[, position][, head])."""
        rows = [r for r in self.rows if r["sweep"] == sweep and r["method"] == method]
        if not rows:
            raise KeyError(f"no rows for sweep {sweep!r} method {method!r}")
        axes = [a for a in ("layer", "position", "head") if rows[0][a] is not None]
        sizes = [max(r[a] for r in rows) + 1 for a in axes]
        out = torch.full(sizes, float("nan"), dtype=torch.float64)
        for r in rows:
            out[tuple(r[a] for a in axes)] = r[key]
        return out

    def to_arrow(self):
        """The ``patching`` table rows (the store's schema for that table)."""
        import pyarrow as pa

        from interplab.store.layout import KNOWN_SCHEMAS

        return pa.Table.from_pylist(self.rows, schema=KNOWN_SCHEMAS["patching"])

    def baselines_arrow(self):
        """Baselines and exact-vs-AtP correlations as ``baselines`` table rows."""
        rows = [{"sweep": "", "name": k, "value": v} for k, v in self.baselines.items()]
        rows += [{"sweep": s, "name": "exact_atp_correlation", "value": v} for s, v in self.correlation.items()]
        return baselines_table(rows)


def baselines_table(rows: list[dict]):
    import pyarrow as pa

    from interplab.store.layout import KNOWN_SCHEMAS

    return pa.Table.from_pylist(rows, schema=KNOWN_SCHEMAS["baselines"])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    keep = ~(a.isnan() | b.isnan())
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")
