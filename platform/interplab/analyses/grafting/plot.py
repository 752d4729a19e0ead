"""Figures of a grafting run: rank tables (grafting, freezing), rank per epoch (ordering), score heatmaps.

    plot_grafting(store, run_id, "grafting.png")

Ranks are means over lr, epochs and seeds of each (variant, layers, eval set); the bars' error
marks are the min and max over those runs. Score heatmaps average over the run's lr/seed chunks:
MLP scores by layer × position, head scores by layer × head (summed over positions).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

# Draws one panel on (figure, axes); the figure is needed for colour bars.
Panel = Callable[[Any, Any], None]


def _bars(ax, rows: list[dict], sets: list[str], title: str) -> None:
    groups = sorted({(r["variant"], r["layers"]) for r in rows}, key=lambda g: (g[0] != "base", g))
    width = 0.8 / max(1, len(sets))
    for k, eval_set in enumerate(sets):
        means, lo, hi = [], [], []
        for g in groups:
            vals = [r["mean_rank"] for r in rows if (r["variant"], r["layers"]) == g and r["eval_set"] == eval_set]
            means.append(np.mean(vals) if vals else np.nan)
            lo.append(means[-1] - (min(vals) if vals else np.nan))
            hi.append((max(vals) if vals else np.nan) - means[-1])
        x = np.arange(len(groups)) + k * width
        ax.bar(x, means, width, yerr=[lo, hi], label=eval_set, capsize=2)
        for xi, m in zip(x, means):
            if m == m:
                ax.text(xi, m, f"{m:.1f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
    ax.set_xticklabels([v if lay == "all" else f"{v}\n({lay})" for v, lay in groups], fontsize=7, rotation=30)
    ax.set_ylabel("mean rank (0 = top)")
    ax.set_title(title)
    ax.legend(fontsize=7)


def _ordering(ax, rows: list[dict]) -> None:
    for order in sorted({r["variant"] for r in rows}):
        part = [r for r in rows if r["variant"] == order and r["eval_set"] == "ImplF_new"]
        epochs = sorted({r["epoch"] for r in part})
        ax.plot(epochs, [np.mean([r["mean_rank"] for r in part if r["epoch"] == e]) for e in epochs], marker="o", label=order)
    ax.set_xlabel("epoch of phase 2 (new facts only)")
    ax.set_ylabel("ImplF_new mean rank")
    ax.set_title("data ordering")
    ax.legend(fontsize=7)


def _heat(fig, ax, grid: np.ndarray, title: str, xlabel: str, xticks: list[str] | None = None) -> None:
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("layer")
    ax.set_xlabel(xlabel)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)))
        ax.set_xticklabels(xticks, rotation=90, fontsize=6)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def score_grids(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """score -> (MLP grid [layer, position], head grid [layer, head], position tokens)."""
    out = {}
    for score in ("upstream", "downstream", "informative"):
        part = [r for r in rows if r["score"] == score]
        if not part:
            continue
        n_layers = max(r["layer"] for r in part) + 1
        n_pos = max(r["position"] for r in part) + 1
        n_heads = max((r["head"] for r in part if r["component"] == "head"), default=-1) + 1
        mlp = np.zeros((n_layers, n_pos))
        mlp_n = np.zeros_like(mlp)
        heads = np.zeros((n_layers, max(1, n_heads)))
        runs = len({(r["lr"], r["epochs"], r["seed"]) for r in part})
        tokens = [""] * n_pos
        for r in part:
            if r["component"] == "mlp":
                mlp[r["layer"], r["position"]] += r["value"]
                mlp_n[r["layer"], r["position"]] += 1
                tokens[r["position"]] = r["token"]
            elif r["component"] == "head":
                heads[r["layer"], r["head"]] += r["value"] / runs
        out[score] = (np.divide(mlp, mlp_n, out=np.full_like(mlp, np.nan), where=mlp_n > 0), heads, tokens)
    return out


def plot_grafting(store, run_id: str, output: str | Path) -> Path:
    """Write the figure of grafting run ``run_id`` of ``store`` to ``output`` (.png/.svg/.pdf); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    if output.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"output {output} must end in .png, .svg or .pdf")
    views = set(store.views())
    evals = store.sql("SELECT * FROM grafting WHERE run_id = $r", {"r": run_id}).to_pylist() if "grafting" in views else []
    scores = (
        store.sql("SELECT * FROM grafting_scores WHERE run_id = $r", {"r": run_id}).to_pylist()
        if "grafting_scores" in views
        else []
    )
    panels: list[Panel] = []
    graft = [r for r in evals if r["experiment"] == "grafting"]
    if graft:
        panels.append(lambda fig, ax: _bars(ax, graft, ["F_prime", "ImplF", "ImplF_prime"], "grafting: W_F' + delta"))
    freezing = [r for r in evals if r["experiment"] == "freezing"]
    if freezing:
        panels.append(lambda fig, ax: _bars(ax, freezing, ["F", "ImplF"], "layer freezing (facts only)"))
    ordering = [r for r in evals if r["experiment"] == "ordering"]
    if ordering:
        panels.append(lambda fig, ax: _ordering(ax, ordering))
    grids = score_grids(scores)
    for score, (mlp, heads, tokens) in grids.items():
        panels.append(partial(_heat, grid=mlp, title=f"{score} score: MLP", xlabel="position", xticks=tokens))
        panels.append(partial(_heat, grid=heads, title=f"{score} score: heads (sum over positions)", xlabel="head"))
    if not panels:
        raise ValueError(f"run {run_id!r} has no grafting results to plot")
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels):
        draw(fig, ax)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"grafting run {run_id}")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
