"""The prompt's tokens shaded by their attribution: one panel per (prompt, method).

Red tokens support the target (perturbing them lowers its log-prob), blue ones oppose it; each panel
has its own colour scale, symmetric around 0. Tokens the tokenizer added (not perturbed) are grey.
"""

from __future__ import annotations

from pathlib import Path

LINE_CHARS = 96


def _text(piece: str) -> str:
    return piece.replace("\n", "⏎").replace("\t", "⇥") or "∅"


def layout(tokens: list[str], width: int = LINE_CHARS) -> list[tuple[int, int, str]]:
    """``(line, column, text)`` of each token, wrapped at ``width`` characters (a monospace layout)."""
    out = []
    line = column = 0
    for piece in tokens:
        text = _text(piece)
        if column and column + len(text) > width:
            line, column = line + 1, 0
        out.append((line, column, text))
        column += len(text)
    return out


def plot_attributions(panels: list[dict], out: str | Path, title: str = "") -> Path:
    """Write ``panels`` (each ``{"title", "tokens", "attribution"}``, attribution None for tokens not
    perturbed) to ``out`` (.png, .svg or .pdf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colors

    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"output {out} must end in .png, .svg or .pdf")
    if not panels:
        raise ValueError("the run has no attribution rows to plot")
    placed = [layout(p["tokens"]) for p in panels]
    heights = [max(line for line, _, _ in lay) + 1 for lay in placed]
    fontsize = 9.0
    char_in = 0.6 * fontsize / 72
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(LINE_CHARS * char_in + 1.8, sum(0.28 * h + 0.7 for h in heights) + 0.4),
        squeeze=False,
        gridspec_kw={"height_ratios": [h + 2 for h in heights]},
    )
    cmap = matplotlib.colormaps["RdBu_r"]
    for ax, panel, lay, height in zip(axes[:, 0], panels, placed, heights):
        values = [v for v in panel["attribution"] if v is not None]
        limit = max((abs(v) for v in values), default=0.0) or 1.0
        norm = colors.Normalize(vmin=-limit, vmax=limit)
        for (line, column, text), value in zip(lay, panel["attribution"]):
            face = "#dddddd" if value is None else cmap(norm(value))
            ax.text(
                column,
                -line,
                text,
                family="monospace",
                fontsize=fontsize,
                va="center",
                ha="left",
                bbox={"facecolor": face, "edgecolor": "none", "pad": 1.0},
            )
        ax.set_xlim(-0.5, LINE_CHARS + 0.5)
        ax.set_ylim(-height + 0.4, 0.6)
        ax.axis("off")
        ax.set_title(panel["title"], fontsize=9, loc="left")
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.025, pad=0.01, label="Δ log p")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
