"""Probe accuracy by layer: train and held-out accuracy per site, with the majority-class floor."""

from __future__ import annotations

from pathlib import Path


def plot_probes(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Write accuracy-vs-layer curves of ``rows`` (``probes`` rows of one run) to ``out`` (.png/.svg/.pdf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"output {out} must end in .png, .svg or .pdf")
    if not rows:
        raise ValueError("the run has no probes rows to plot")
    sites = sorted({r["site"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, site in enumerate(sites):
        part = sorted((r for r in rows if r["site"] == site), key=lambda r: -1 if r["layer"] is None else r["layer"])
        layers = [-1 if r["layer"] is None else r["layer"] for r in part]
        colour = colours[i % len(colours)]
        ax.plot(layers, [r["test_accuracy"] for r in part], "o-", color=colour, label=f"{site} test")
        ax.plot(layers, [r["train_accuracy"] for r in part], ":", color=colour, label=f"{site} train")
        ax.plot(
            layers, [r["majority"] for r in part], "--", color="grey", linewidth=0.8, label="majority class" if i == 0 else None
        )
    first = rows[0]
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"probe of {first['label']!r} ({first['n_classes']} classes) at position {first['position']}")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
