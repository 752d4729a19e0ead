"""Heatmaps of a patching run: layers x token positions (or heads), one panel per sweep and method.

Values are the ``normalized`` scores (clean = 1, corrupted = 0), drawn on a diverging colour scale
centred on 0; position axes are labelled with the clean prompt's tokens (prompt 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def heatmap_grids(rows: list[dict]) -> list[tuple[str, str, np.ndarray, str]]:
    """``(sweep, method, grid[layer, x], x_axis)`` per panel; 3-axis sweeps are averaged over positions."""
    panels = []
    keys = sorted({(r["sweep"], r["method"]) for r in rows})
    for sweep, method in keys:
        part = [r for r in rows if r["sweep"] == sweep and r["method"] == method]
        n_layers = max(r["layer"] for r in part) + 1
        has_pos = part[0]["position"] is not None
        has_head = part[0]["head"] is not None
        if has_head:
            x_axis, key = "head", "head"
        elif has_pos:
            x_axis, key = "position", "position"
        else:
            x_axis, key = "layer only", None
        width = (max(r[key] for r in part) + 1) if key else 1
        total = np.zeros((n_layers, width))
        count = np.zeros((n_layers, width))
        for r in part:
            x = r[key] if key else 0
            total[r["layer"], x] += r["normalized"]
            count[r["layer"], x] += 1
        grid = np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)
        if has_head and has_pos:
            x_axis = "head (mean over positions)"
        panels.append((sweep, method, grid, x_axis))
    return panels


def plot_patching(rows: list[dict], tokens: list[str], out: str | Path, title: str = "") -> Path:
    """Write the heatmaps of ``rows`` (patching rows of one run) to ``out`` (.png, .svg or .pdf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"output {out} must end in .png, .svg or .pdf")
    if not rows:
        raise ValueError("the run has no patching rows to plot")
    panels = heatmap_grids(rows)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(max(4.5, 0.45 * panels[0][2].shape[1] + 2.5) * len(panels), 0.22 * panels[0][2].shape[0] + 2.5),
        squeeze=False,
    )
    for ax, (sweep, method, grid, x_axis) in zip(axes[0], panels):
        limit = np.nanmax(np.abs(grid)) or 1.0
        image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        ax.set_title(f"{sweep} ({method})")
        ax.set_ylabel("layer")
        if x_axis == "position" and len(tokens) >= grid.shape[1]:
            ax.set_xticks(range(grid.shape[1]))
            ax.set_xticklabels([f"{t!r}"[1:-1] + f" {i}" for i, t in enumerate(tokens[: grid.shape[1]])], rotation=90, fontsize=7)
            ax.set_xlabel("position (token)")
        else:
            ax.set_xlabel(x_axis)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="normalized (clean=1, corrupted=0)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
