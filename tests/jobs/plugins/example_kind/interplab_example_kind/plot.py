"""The ``example`` kind's picture: tokens per word, as bars."""

from __future__ import annotations

from pathlib import Path


def plot_run(store, run_id: str, output: Path, method: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = store.sql("SELECT word, n_tokens FROM example_words WHERE run_id = $run_id ORDER BY word_index",
                     {"run_id": run_id}).to_pylist()
    if not rows:
        raise ValueError(f"run {run_id} has no example_words rows")
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar([r["word"] for r in rows], [r["n_tokens"] for r in rows])
    ax.set_ylabel("tokens")
    ax.set_title(run_id, fontsize=8)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return [Path(output)]
