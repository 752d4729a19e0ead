"""The picture of a partition run: region sizes (largest first, labelled with their exemplar's token)
and the distribution of nearest-exemplar distances against the threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_partition(
    exemplars: list[dict[str, Any]], distances: np.ndarray, meta: dict[str, Any], out: str | Path, title: str = ""
) -> Path:
    """Write the two panels to ``out`` (.png, .svg or .pdf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_size = sorted(exemplars, key=lambda r: -r["n_members"])
    shown = by_size[:40]
    left.bar(range(len(shown)), [r["n_members"] for r in shown], color="#4C72B0")
    left.set_xticks(range(len(shown)))
    left.set_xticklabels([f"{r['region']}:{(r['token'] or '').strip()[:10]!s}" for r in shown], rotation=90, fontsize=7)
    left.set_ylabel("members")
    left.set_title(f"{len(exemplars)} regions (largest {len(shown)}; region:exemplar token)")
    right.hist(np.asarray(distances, dtype=np.float64), bins=50, color="#55A868")
    threshold = meta.get("threshold")
    if threshold is not None:
        right.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold:.3g}")
        right.legend()
    right.set_xlabel(f"nearest-exemplar distance ({meta.get('metric', '')})")
    right.set_ylabel("rows")
    right.set_title(f"{meta.get('site') or 'sql selection'}: {meta.get('n_rows', len(distances))} rows")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
