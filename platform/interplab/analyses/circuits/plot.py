"""Circuit diagrams (nodes by layer) and faithfulness curves of a ``circuit`` run.

The diagram is drawn with matplotlib (always installed) in the layered layout graphviz's ``dot``
would give a transformer: input at the bottom, one row per layer (heads, then the MLP), logits on
top; edge colour says which input of the destination it feeds (q, k, v, MLP, logits), width its
|score|. ``.dot`` output writes Graphviz source instead, for ``dot -Tsvg`` where graphviz exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from interplab.analyses.circuits.graph import Dest, Node

_COLORS = {"q": "tab:blue", "k": "tab:green", "v": "tab:red", "mlp": "tab:purple", "logits": "black"}


@dataclass(frozen=True)
class _Edge:
    src: Node
    dst: Dest
    score: float
    weight: float  # |score| relative to the largest

    @property
    def feeds(self) -> str:
        """Which input of the destination the edge feeds: q, k, v, mlp or logits."""
        return self.dst.qkv or self.dst.node.kind


def _edges(rows: list[dict]) -> list[_Edge]:
    """Store rows (``src``, ``dst`` MIB names, ``score``) as typed edges."""
    top = max((abs(r["score"]) for r in rows), default=1.0) or 1.0
    return [_Edge(Node.parse(r["src"]), Dest.parse(r["dst"]), r["score"], abs(r["score"]) / top) for r in rows]


def _position(node: Node, n_heads: int, n_layers: int) -> tuple[float, float]:
    if node.kind == "input":
        return (n_heads / 2, -1.0)
    if node.kind == "logits":
        return (n_heads / 2, float(n_layers))
    if node.kind == "head":
        return (float(node.head_index), float(node.layer_index))
    return (float(n_heads) + 0.5, float(node.layer_index))


def to_dot(edges: list[dict]) -> str:
    """Graphviz source of ``edges`` (dicts with ``src``, ``dst`` MIB names and ``score``)."""
    lines = ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, fontsize=10];"]
    for e in _edges(edges):
        lines.append(
            f'  "{e.src}" -> "{e.dst.node}" [color="{_COLORS[e.feeds].replace("tab:", "")}", '
            f'label="{e.feeds}", penwidth={1 + 3 * e.weight:.2f}];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_circuit(edges: list[dict], n_layers: int, n_heads: int, output: str | Path, title: str = "") -> Path:
    """``edges``: dicts with ``src``, ``dst`` (MIB names) and ``score``."""
    output = Path(output)
    if output.suffix == ".dot":
        output.write_text(to_dot(edges))
        return output
    typed = _edges(edges)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, n_heads * 0.7), max(5, n_layers * 0.45)))
    nodes = {e.src for e in typed} | {e.dst.node for e in typed}
    for e in typed:
        x0, y0 = _position(e.src, n_heads, n_layers)
        x1, y1 = _position(e.dst.node, n_heads, n_layers)
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops={
                "arrowstyle": "-|>",
                "color": _COLORS[e.feeds],
                "lw": 0.4 + 2.5 * e.weight,
                "alpha": 0.35 + 0.6 * e.weight,
                "shrinkA": 6,
                "shrinkB": 6,
            },
        )
    for node in nodes:
        x, y = _position(node, n_heads, n_layers)
        ax.text(
            x,
            y,
            str(node),
            ha="center",
            va="center",
            fontsize=7,
            bbox={"boxstyle": "round", "fc": "lightyellow" if node.kind == "head" else "lavender", "lw": 0.5},
        )
    for kind, color in _COLORS.items():
        ax.plot([], [], color=color, label=kind)
    ax.legend(loc="upper right", fontsize=7, title="edge into", title_fontsize=7)
    ax.set_xlim(-1, n_heads + 1.5)
    ax.set_ylim(-1.7, n_layers + 0.7)
    ax.set_ylabel("layer")
    ax.set_xticks([])
    ax.set_title(title or f"circuit: {len(edges)} edges", fontsize=9)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output


def draw_faithfulness(rows: list[dict], output: str | Path, title: str = "") -> Path:
    """Faithfulness vs edge fraction, one line per (method, ranking)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({(r["method"], r["rule"], r["absolute"]) for r in rows})
    for method, rule, absolute in keys:
        pts = sorted(
            (r["fraction"], r["faithfulness"])
            for r in rows
            if (r["method"], r["rule"], r["absolute"]) == (method, rule, absolute)
        )
        ax.plot(
            [100 * x for x, _ in pts],
            [y for _, y in pts],
            marker="o",
            ms=3,
            label=f"{method} ({rule}, {'|score|' if absolute else 'signed'})",
        )
    ax.axhline(1.0, color="grey", lw=0.5, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("edges in circuit (% of graph)")
    ax.set_ylabel("faithfulness f")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return Path(output)


def plot_circuit_run(store, run_id: str, output: str | Path, method: str | None = None) -> list[Path]:
    """The circuit diagram of ``method`` (default: the run's first) to ``output``, and the run's
    faithfulness curves next to it (``<stem>-faithfulness<suffix>``)."""
    summary = store.sql(
        "SELECT method FROM circuit_summary WHERE run_id = $run_id ORDER BY method", {"run_id": run_id}
    ).to_pylist()
    if not summary:
        raise ValueError(f"run {run_id} has no circuit results")
    methods = [r["method"] for r in summary]
    method = method or methods[0]
    if method not in methods:
        raise ValueError(f"run {run_id} has no method {method!r}; it has {', '.join(methods)}")
    edges = store.sql(
        "SELECT e.src, e.dst, e.score FROM edges e JOIN circuits c USING (run_id, method, src, dst) "
        "WHERE run_id = $run_id AND method = $method",
        {"run_id": run_id, "method": method},
    ).to_pylist()
    sources = [
        Node.parse(r["src"])
        for r in store.sql("SELECT DISTINCT src FROM edges WHERE run_id = $run_id", {"run_id": run_id}).to_pylist()
    ]
    n_layers = 1 + max((node.layer for node in sources if node.layer is not None), default=0)
    n_heads = 1 + max((node.head for node in sources if node.head is not None), default=0)
    output = Path(output)
    paths = [draw_circuit(edges, n_layers, n_heads, output, title=f"{run_id}: {method}, {len(edges)} edges")]
    rows = store.sql(
        "SELECT method, rule, absolute, fraction, faithfulness FROM faithfulness WHERE run_id = $run_id", {"run_id": run_id}
    ).to_pylist()
    if rows and output.suffix != ".dot":
        paths.append(draw_faithfulness(rows, output.with_name(f"{output.stem}-faithfulness{output.suffix}"), title=run_id))
    return paths
