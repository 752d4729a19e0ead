"""What a workload costs per layer, as an analysis declares it (a pipeline balances its stages by it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerWork:
    """Relative compute of a workload: per decoder layer, plus what the first stage (embedding) and
    the last stage (final norm and unembedding) add. Any unit; only ratios matter."""

    layers: tuple[float, ...]
    first: float = 0.0
    last: float = 0.0

    def __post_init__(self) -> None:
        values = (*self.layers, self.first, self.last)
        if not self.layers or any(not v >= 0 for v in values) or not any(v > 0 for v in self.layers):
            raise ValueError(f"layer work must be non-negative numbers, some layer's above zero; got {self!r}")
