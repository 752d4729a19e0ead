"""Faithfulness curves, MIB's CPR and CMD, and export in MIB's submission format.

``f(C) = (m(C) - m(∅)) / (m(N) - m(∅))`` with ``m`` the task metric averaged over the prompts, ``N``
the full graph and ``∅`` the empty one (every edge corrupted). MIB (Mueller et al. 2025) scores a
method by circuits of 0.1 % … 100 % of the edges: CPR is the area under ``f`` (circuits of the
highest *signed* scores; higher is better), CMD the area under ``|1 - f|`` (circuits of the highest
*absolute* scores; lower is better). Areas are trapezoids over the edge fraction, from 0 (the empty
circuit, ``f = 0``) to 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from interplab.analyses.circuits import extract
from interplab.analyses.circuits.evaluate import evaluate
from interplab.analyses.circuits.graph import CircuitGraph
from interplab.analyses.circuits.task import CircuitTask

MIB_PERCENTS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
Rule = Literal["topn", "greedy"]


@dataclass
class Curve:
    """One faithfulness curve: circuits of ``sizes`` edges (after pruning: ``kept``)."""

    method: str
    rule: str
    absolute: bool
    sizes: list[int]
    kept: list[int]
    values: list[float]  # m(C), mean over prompts
    faithfulness: list[float]
    full: float
    empty: float
    n_edges: int
    circuits: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def fractions(self) -> list[float]:
        return [s / self.n_edges for s in self.sizes]

    def area(self, deviation: bool = False) -> float:
        """Trapezoid area under ``f`` (or ``|1 - f|``) over the edge fraction, starting at (0, f(∅) = 0)."""
        xs = [0.0] + self.fractions
        ys = [1.0 if deviation else 0.0] + [abs(1 - f) if deviation else f for f in self.faithfulness]
        return float(sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)))


def mib_sizes(graph: CircuitGraph, percents=MIB_PERCENTS) -> list[int]:
    return sorted({max(1, round(graph.n_edges * p / 100)) for p in percents})


def faithfulness_curve(
    task: CircuitTask,
    scores: torch.Tensor,
    *,
    method: str = "",
    sizes: list[int] | None = None,
    rule: Rule = "topn",
    absolute: bool = False,
    prune: bool = True,
    keep_circuits: bool = False,
) -> Curve:
    graph = task.graph
    sizes = sizes or mib_sizes(graph)
    masks = torch.stack(
        [extract.circuit(graph, scores, rule=rule, size=n, absolute=absolute, prune_dangling=prune) for n in sizes]
    )
    values = evaluate(task, masks).float()
    full, empty = float(task.clean_value.float().mean()), float(task.corrupt_value.float().mean())
    span = full - empty
    faith = [(float(v) - empty) / span if span != 0 else float("nan") for v in values]
    return Curve(
        method,
        rule,
        absolute,
        list(sizes),
        [int(m.sum()) for m in masks],
        [float(v) for v in values],
        faith,
        full,
        empty,
        graph.n_edges,
        list(masks) if keep_circuits else [],
    )


def cpr_cmd(
    task: CircuitTask, scores: torch.Tensor, *, method: str = "", rule: Rule = "topn"
) -> tuple[float, float, Curve, Curve]:
    """MIB's CPR (signed scores) and CMD (absolute scores) with their two curves."""
    signed = faithfulness_curve(task, scores, method=method, rule=rule, absolute=False)
    absolute = faithfulness_curve(task, scores, method=method, rule=rule, absolute=True)
    return signed.area(), absolute.area(deviation=True), signed, absolute


def to_mib(graph: CircuitGraph, scores: torch.Tensor, mask: torch.Tensor | None = None, *, d_model: int | None = None) -> dict:
    """The MIB/EAP-IG graph JSON: ``cfg``, ``nodes`` (``in_graph``) and ``edges`` (``score``, ``in_graph``)."""
    mask = graph.allowed if mask is None else graph.check_mask(mask)
    edges = {}
    for src, dst in graph.edges.tolist():
        edges[graph.edge_name(src, dst)] = {"score": float(scores[src, dst]), "in_graph": bool(mask[src, dst])}
    src, dst = mask.nonzero(as_tuple=True)
    node_in = set(src.tolist()) | set(graph.dest_owner[dst].tolist())  # indices into graph.nodes
    nodes = {name: i in node_in for i, name in enumerate(graph.node_names)}
    cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": graph.parallel}
    if d_model is not None:
        cfg["d_model"] = d_model
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def write_mib(path: str | Path, graph: CircuitGraph, scores: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_mib(graph, scores, mask, **kwargs)))
    tmp.replace(path)
    return path


def read_mib(path: str | Path) -> tuple[CircuitGraph, torch.Tensor, torch.Tensor]:
    """Scores and ``in_graph`` mask back from an MIB JSON file (round trip of :func:`write_mib`)."""
    data = json.loads(Path(path).read_text())
    cfg = data["cfg"]
    graph = CircuitGraph(cfg["n_layers"], cfg["n_heads"], parallel=bool(cfg.get("parallel_attn_mlp", False)))
    scores = torch.zeros(graph.n_sources, graph.n_dests)
    mask = graph.empty()
    for name, edge in data["edges"].items():
        i, j = graph.parse_edge(name)
        scores[i, j] = edge["score"]
        mask[i, j] = bool(edge["in_graph"])
    return graph, scores, mask
