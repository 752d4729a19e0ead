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


def _dests_of_source(graph: CircuitGraph, src: int) -> list[int]:
    """The destinations belonging to source ``src``'s node (a head's q/k/v inputs, an MLP's input)."""
    if src == 0:
        return []
    layer, within = divmod(src - 1, graph.n_heads + 1)
    if within == graph.n_heads:
        return [graph.mlp_dest(layer)]
    return [graph.qkv_dest(layer, within, which) for which in ("q", "k", "v")]


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
            for d in _dests_of_source(graph, src):
                open_dest(d)
    return mask


def prune(graph: CircuitGraph, mask: torch.Tensor) -> torch.Tensor:
    """Drop edges that cannot matter: out of a node no kept edge reaches from the input (it computes
    from corrupted inputs only, so its output is the corrupted one), or into a node with no kept
    path to the logits."""
    mask = graph.check_mask(mask).clone()
    node_of_dest = torch.empty(graph.n_dests, dtype=torch.long)
    for src in range(graph.n_sources):
        for d in _dests_of_source(graph, src):
            node_of_dest[d] = src
    node_of_dest[graph.logits_dest] = graph.n_sources  # the logits node
    n_nodes = graph.n_sources + 1
    while True:
        node_edges = torch.zeros(graph.n_sources, n_nodes, dtype=torch.bool)
        src_idx, dst_idx = mask.nonzero(as_tuple=True)
        node_edges[src_idx, node_of_dest[dst_idx]] = True
        forward = torch.zeros(n_nodes, dtype=torch.bool)
        forward[0] = True
        for node in range(1, n_nodes):  # sources are in topological order, the logits last
            forward[node] = bool((node_edges[:, node] & forward[: graph.n_sources]).any())
        backward = torch.zeros(n_nodes, dtype=torch.bool)
        backward[-1] = True
        for node in reversed(range(graph.n_sources)):
            backward[node] = bool((node_edges[node] & backward).any())
        new = mask & forward[: graph.n_sources, None] & backward[node_of_dest][None, :]
        if torch.equal(new, mask):
            return new
        mask = new
