"""From edge scores to circuits: top-n, threshold, greedy growth from the logits, pruning.

A circuit is a bool ``[n_sources, n_dests]`` mask of kept edges. ``absolute=True`` ranks edges by
``|score|`` (MIB's CMD), ``False`` by the signed score (MIB's CPR: edges that support the metric).
"""

from __future__ import annotations

import heapq

import torch

from interplab.analyses.circuits.graph import CircuitGraph


def _ranked(graph: CircuitGraph, scores: torch.Tensor, absolute: bool) -> torch.Tensor:
    values = scores.abs() if absolute else scores
    return torch.where(graph.allowed, values.float(), torch.tensor(float("-inf")))


def top_n(graph: CircuitGraph, scores: torch.Tensor, n: int, *, absolute: bool = False) -> torch.Tensor:
    """The ``n`` highest-scoring edges (ties broken by edge order)."""
    n = max(0, min(int(n), graph.n_edges))
    ranked = _ranked(graph, scores, absolute).flatten()
    mask = torch.zeros(ranked.numel(), dtype=torch.bool)
    if n:
        mask[torch.topk(ranked, n, sorted=False).indices] = True
    return mask.reshape(graph.n_sources, graph.n_dests) & graph.allowed


def threshold(graph: CircuitGraph, scores: torch.Tensor, tau: float, *, absolute: bool = False) -> torch.Tensor:
    """Every edge whose (absolute) score is at least ``tau``."""
    return (_ranked(graph, scores, absolute) >= tau) & graph.allowed


def greedy(graph: CircuitGraph, scores: torch.Tensor, n: int, *, absolute: bool = False) -> torch.Tensor:
    """Grow from the logits: repeatedly add the best edge into a node already in the circuit."""
    ranked = _ranked(graph, scores, absolute)
    mask = graph.empty()
    heap: list[tuple[float, int, int]] = []
    reached: set[int] = set()

    def open_dest(dest: int) -> None:
        for src in range(graph.upstream(dest)):
            heapq.heappush(heap, (-float(ranked[src, dest]), src, dest))

    open_dest(graph.logits_dest)
    added = 0
    while heap and added < n:
        _, src, dest = heapq.heappop(heap)
        mask[src, dest] = True
        added += 1
        if src not in reached:
            reached.add(src)
            for d in (graph.dest_owner == src).nonzero(as_tuple=True)[0].tolist():
                open_dest(d)
    return mask


def prune(graph: CircuitGraph, mask: torch.Tensor) -> torch.Tensor:
    """Drop edges that cannot matter: out of a node no kept edge reaches from the input (it computes
    from corrupted inputs only, so its output is the corrupted one), or into a node with no kept
    path to the logits. One pass is a fixpoint: every edge on a kept edge's path is kept too."""
    mask = graph.check_mask(mask)
    owner = graph.dest_owner
    n_nodes = len(graph.nodes)  # sources in topological order, then the logits
    node_edges = torch.zeros(graph.n_sources, n_nodes, dtype=torch.bool)
    src_idx, dst_idx = mask.nonzero(as_tuple=True)
    node_edges[src_idx, owner[dst_idx]] = True
    forward = torch.zeros(n_nodes, dtype=torch.bool)
    forward[0] = True
    for node in range(1, n_nodes):
        forward[node] = bool((node_edges[:, node] & forward[: graph.n_sources]).any())
    backward = torch.zeros(n_nodes, dtype=torch.bool)
    backward[-1] = True
    for node in reversed(range(graph.n_sources)):
        backward[node] = bool((node_edges[node] & backward).any())
    return mask & forward[: graph.n_sources, None] & backward[owner][None, :]


def circuit(
    graph: CircuitGraph,
    scores: torch.Tensor,
    *,
    rule: str = "topn",
    size: int | None = None,
    tau: float | None = None,
    absolute: bool = False,
    prune_dangling: bool = True,
) -> torch.Tensor:
    """One circuit by ``rule``: ``topn``/``greedy`` (``size`` edges) or ``threshold`` (``tau``), then pruned."""
    if rule == "threshold":
        if tau is None:
            raise ValueError("circuit rule 'threshold' needs tau (the lowest score kept), got tau=None")
        mask = threshold(graph, scores, tau, absolute=absolute)
    elif rule in ("topn", "greedy"):
        if size is None:
            raise ValueError(f"circuit rule {rule!r} needs size (the number of edges), got size=None")
        mask = (greedy if rule == "greedy" else top_n)(graph, scores, size, absolute=absolute)
    else:
        raise ValueError(f"unknown circuit rule {rule!r}; use topn, greedy or threshold")
    return prune(graph, mask) if prune_dangling else mask
