"""The computational graph circuits are found in.

Sources (nodes that write to the residual stream) are the input embeddings, every attention head
and every MLP. Destinations (nodes that read it) are every head's query, key and value input
(grouped-query heads expanded to query heads), every MLP's input and the logits. An edge joins a
source to every destination that reads the stream after the source wrote to it: heads and MLPs of
earlier layers; within a layer the MLP reads the layer's heads unless the family runs attention and
MLP in parallel. GPT-2 small has 32,491 edges under this rule (``docs/circuits.md`` lists others).

Nodes are typed values (:class:`Node`, and :class:`Dest` for a node's inputs); their string forms
follow MIB/EAP-IG (``input``, ``a3.h5``, ``m3``, ``logits``; destinations ``a3.h5<q>``) and are used
only at boundaries (the store's ``src``/``dst`` columns, MIB JSON, plots), parsed back by
:meth:`Node.parse` / :meth:`Dest.parse`. Scores and masks are ``[n_sources, n_destinations]``
matrices; :attr:`CircuitGraph.allowed` says which entries are edges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from interplab.engine.sites import Site, SiteKind
from interplab.models.arch import ArchSpec, registered_archs

# "q" -> q_in, "k" -> k_in, "v" -> v_in: the split-input kinds, i.e. those with a ``qkv`` projection
_INPUT_KIND = {kind.qkv: kind for kind in SiteKind if kind.qkv is not None}
QKV = tuple(_INPUT_KIND)  # ("q", "k", "v"): the order of a layer's head destinations
Level = Literal["edge", "node"]
NodeKind = Literal["input", "head", "mlp", "logits"]
NODE_KINDS = ("input", "head", "mlp", "logits")

_NODE_TEXT = re.compile(r"input|logits|a(?P<layer>\d+)\.h(?P<head>\d+)|m(?P<mlp>\d+)")
_DEST_TEXT = re.compile(r"(?P<node>[^<>]+)(?:<(?P<qkv>[^<>]*)>)?")
_EDGE_ARROW = "->"


class GraphError(ValueError):
    """A model the circuit graph cannot describe, or a malformed circuit, node or edge."""


@dataclass(frozen=True)
class Node:
    """One node: the ``input`` embeddings, head ``a{L}.h{H}``, MLP ``m{L}`` or the ``logits``.

    Every node but the logits is a source (it writes to the residual stream); every node but the
    input reads the stream through its :class:`Dest` inputs. ``str(node)`` is the MIB/EAP-IG name.
    """

    kind: NodeKind
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in NODE_KINDS:
            raise GraphError(f"unknown node kind {self.kind!r}; allowed: {', '.join(NODE_KINDS)}")
        for name, value, wanted in (
            ("layer", self.layer, self.kind in ("head", "mlp")),
            ("head", self.head, self.kind == "head"),
        ):
            if wanted and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise GraphError(f"a {self.kind} node needs a non-negative integer {name}, got {value!r}")
            if not wanted and value is not None:
                raise GraphError(f"a {self.kind} node has no {name}, got {name}={value!r}")

    @classmethod
    def parse(cls, text: str) -> Node:
        """Read the MIB name back: ``input``, ``a3.h5``, ``m3``, ``logits``."""
        match = _NODE_TEXT.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise GraphError(f"cannot parse circuit node {text!r}; expected input, a<layer>.h<head>, m<layer> or logits")
        if match["layer"] is not None:
            return cls("head", int(match["layer"]), int(match["head"]))
        if match["mlp"] is not None:
            return cls("mlp", int(match["mlp"]))
        return cls("input") if text == "input" else cls("logits")

    @property
    def layer_index(self) -> int:
        """The layer of a head or MLP node (a :class:`GraphError` for the input and the logits)."""
        if self.layer is None:
            raise GraphError(f"the {self} node has no layer; only head and mlp nodes do")
        return self.layer

    @property
    def head_index(self) -> int:
        """The head index of a head node (a :class:`GraphError` for any other node)."""
        if self.head is None:
            raise GraphError(f"node {self} is not a head; only head nodes have a head index")
        return self.head

    def __str__(self) -> str:
        if self.kind == "head":
            return f"a{self.layer}.h{self.head}"
        if self.kind == "mlp":
            return f"m{self.layer}"
        return self.kind


@dataclass(frozen=True)
class Dest:
    """One input of a node (a destination): head ``a{L}.h{H}``'s query, key or value input
    (``a3.h5<q>``), an MLP's input (``m3``) or the logits (``logits``)."""

    node: Node
    qkv: str | None = None

    def __post_init__(self) -> None:
        if self.node.kind == "input":
            raise GraphError("the input node reads nothing: it has no destination")
        if self.node.kind == "head" and self.qkv not in QKV:
            raise GraphError(f"a head's destination is its q, k or v input, got {self.qkv!r} for {self.node}")
        if self.node.kind != "head" and self.qkv is not None:
            raise GraphError(f"only heads have q/k/v inputs; {self.node} has one input, got {self.qkv!r}")

    @classmethod
    def parse(cls, text: str) -> Dest:
        """Read the MIB name back: ``a3.h5<q>``, ``m3``, ``logits``."""
        match = _DEST_TEXT.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise GraphError(f"cannot parse circuit destination {text!r}; expected a<layer>.h<head><q|k|v>, m<layer> or logits")
        return cls(Node.parse(match["node"]), match["qkv"])

    @property
    def head_input(self) -> str:
        """Which input of a head this is: ``q``, ``k`` or ``v`` (a :class:`GraphError` for MLPs and logits)."""
        if self.qkv is None:
            raise GraphError(f"destination {self} is not a head's q/k/v input")
        return self.qkv

    def __str__(self) -> str:
        return f"{self.node}<{self.qkv}>" if self.qkv is not None else str(self.node)


def supports_circuits(spec: ArchSpec) -> bool:
    """Whether a family's graph can be built: its heads add to the stream one by one, so it declares
    the per-head q/k/v inputs (``spec.qkv``) and the MLP's input norm (``spec.ln_mlp``). Post-norm
    families (Gemma 2, OLMo 2) declare neither."""
    return spec.per_head_inputs


def circuit_families() -> list[str]:
    """The registered model families circuit discovery supports (from :mod:`interplab.models.arch`)."""
    return sorted(name for name, spec in registered_archs().items() if supports_circuits(spec))


@dataclass(frozen=True)
class CircuitGraph:
    """The edge graph of a model with ``n_layers`` layers of ``n_heads`` heads.

    Sources are ordered ``input``, then per layer its heads and its MLP; destinations per layer the
    heads' q inputs, k inputs, v inputs and the MLP's input, then the logits. Indices are computed
    from :attr:`sources_per_layer` and :attr:`dests_per_layer`; :attr:`sources` and :attr:`dests`
    hold the nodes themselves.
    """

    n_layers: int
    n_heads: int
    parallel: bool = False

    @classmethod
    def of(cls, model) -> CircuitGraph:
        """The graph of a :class:`~interplab.engine.HookedModel` or pipeline model."""
        spec = model.spec
        if not supports_circuits(spec):
            raise GraphError(
                f"circuit graphs need heads that add to the residual stream one by one; the {spec.name} family "
                "normalises attention and MLP outputs before adding them (post-norm). Supported families: "
                + ", ".join(circuit_families())
            )
        return cls(model.n_layers, model.n_heads, parallel=not model.has_resid_mid)

    # ------------------------------------------------------------------ per-layer counts
    @property
    def sources_per_layer(self) -> int:
        """A layer's heads and its MLP."""
        return self.n_heads + 1

    @property
    def dests_per_layer(self) -> int:
        """Every head's q, k and v input, and the MLP's input."""
        return len(QKV) * self.n_heads + 1

    # ------------------------------------------------------------------ sources
    @property
    def n_sources(self) -> int:
        return 1 + self.n_layers * self.sources_per_layer

    def first_source(self, layer: int) -> int:
        """Index of ``layer``'s first source (its head 0); every source before it writes earlier."""
        return 1 + layer * self.sources_per_layer

    def head_source(self, layer: int, head: int) -> int:
        return self.first_source(layer) + head

    def mlp_source(self, layer: int) -> int:
        return self.first_source(layer) + self.n_heads

    @cached_property
    def sources(self) -> list[Node]:
        """Every source in index order."""
        out = [Node("input")]
        for layer in range(self.n_layers):
            out += [Node("head", layer, h) for h in range(self.n_heads)] + [Node("mlp", layer)]
        return out

    def source_index(self, node: Node) -> int:
        """Index of a source node (a :class:`GraphError` for the logits or a node outside the graph)."""
        self._check(node)
        if node.kind == "input":
            return 0
        if node.kind == "head":
            return self.head_source(node.layer_index, node.head_index)
        if node.kind == "mlp":
            return self.mlp_source(node.layer_index)
        raise GraphError("the logits write nothing: they are not a source")

    @cached_property
    def source_names(self) -> list[str]:
        return [str(node) for node in self.sources]

    @cached_property
    def source_layer(self) -> torch.Tensor:
        """Layer of each source (-1 for the input, as in the store's ``src_layer`` column)."""
        return torch.tensor([-1 if node.layer is None else node.layer for node in self.sources])

    @cached_property
    def source_groups(self) -> dict[Site, range]:
        """The engine site each group of sources writes through, with the group's source indices, in
        source order: ``embed`` (the input), then per layer ``head_out.L`` (``[b, s, h, d]``: the
        layer's heads) and ``mlp_out.L``."""
        groups = {Site(SiteKind.EMBED): range(0, 1)}
        for layer in range(self.n_layers):
            first = self.first_source(layer)
            groups[Site(SiteKind.HEAD_OUT, layer)] = range(first, first + self.n_heads)
            groups[Site(SiteKind.MLP_OUT, layer)] = range(self.mlp_source(layer), self.mlp_source(layer) + 1)
        return groups

    # ------------------------------------------------------------------ destinations
    @property
    def n_dests(self) -> int:
        return self.n_layers * self.dests_per_layer + 1

    def layer_dests(self, layer: int) -> range:
        """The destinations ``layer`` reads (``layer == n_layers``: the logits)."""
        first = layer * self.dests_per_layer
        return range(first, first + (1 if layer == self.n_layers else self.dests_per_layer))

    def qkv_dest(self, layer: int, head: int, which: str) -> int:
        return self.layer_dests(layer).start + QKV.index(which) * self.n_heads + head

    def mlp_dest(self, layer: int) -> int:
        return self.layer_dests(layer).start + len(QKV) * self.n_heads

    @property
    def logits_dest(self) -> int:
        return self.n_dests - 1

    @cached_property
    def dests(self) -> list[Dest]:
        """Every destination in index order."""
        out = []
        for layer in range(self.n_layers):
            for which in QKV:
                out += [Dest(Node("head", layer, h), which) for h in range(self.n_heads)]
            out.append(Dest(Node("mlp", layer)))
        return out + [Dest(Node("logits"))]

    def dest_index(self, dest: Dest) -> int:
        """Index of a destination (a :class:`GraphError` for one outside the graph)."""
        node = dest.node
        self._check(node)
        if node.kind == "head":
            return self.qkv_dest(node.layer_index, node.head_index, dest.head_input)
        if node.kind == "mlp":
            return self.mlp_dest(node.layer_index)
        return self.logits_dest

    @cached_property
    def dest_names(self) -> list[str]:
        return [str(dest) for dest in self.dests]

    @cached_property
    def dest_groups(self) -> dict[Site, range]:
        """The engine site holding each group of destinations' inputs, with the group's destination
        indices, in destination order: per layer ``q_in.L``, ``k_in.L``, ``v_in.L`` (``[b, s, h, d]``,
        one destination per head) and ``mlp_in.L``; then the logits' input, the last ``resid_post``."""
        groups = {}
        for layer in range(self.n_layers):
            for which in QKV:
                first = self.qkv_dest(layer, 0, which)
                groups[Site(_INPUT_KIND[which], layer)] = range(first, first + self.n_heads)
            groups[Site(SiteKind.MLP_IN, layer)] = range(self.mlp_dest(layer), self.mlp_dest(layer) + 1)
        groups[Site(SiteKind.RESID_POST, self.n_layers - 1)] = range(self.logits_dest, self.logits_dest + 1)
        return groups

    @cached_property
    def dest_owner(self) -> torch.Tensor:
        """The node index (:attr:`nodes`) each destination belongs to: its source index, or
        ``n_sources`` for the logits."""
        return torch.tensor([self.node_index(dest.node) for dest in self.dests], dtype=torch.long)

    def dest_layer(self, dest: int) -> int:
        """The layer whose forward pass first reads ``dest`` (``n_layers`` for the logits)."""
        return self.n_layers if dest == self.logits_dest else dest // self.dests_per_layer

    def upstream(self, dest: int) -> int:
        """Number of sources that write before ``dest`` reads (sources ``0..upstream-1``)."""
        if dest == self.logits_dest:
            return self.n_sources
        layer = self.dest_layer(dest)
        if dest == self.mlp_dest(layer) and not self.parallel:
            return self.mlp_source(layer)  # the MLP reads its own layer's heads
        return self.first_source(layer)

    # ------------------------------------------------------------------ edges
    @cached_property
    def allowed(self) -> torch.Tensor:
        """Bool ``[n_sources, n_dests]``: which pairs are edges."""
        mask = torch.zeros(self.n_sources, self.n_dests, dtype=torch.bool)
        for dest in range(self.n_dests):
            mask[: self.upstream(dest), dest] = True
        return mask

    @property
    def n_edges(self) -> int:
        return int(self.allowed.sum())

    @cached_property
    def edges(self) -> torch.Tensor:
        """``Long[n_edges, 2]`` (source, destination), ordered by destination then source."""
        dst, src = self.allowed.t().nonzero(as_tuple=True)
        return torch.stack([src, dst], dim=1)

    def edge_name(self, src: int, dst: int) -> str:
        """The MIB name of an edge, ``a0.h1->a2.h3<k>``."""
        return f"{self.source_names[src]}{_EDGE_ARROW}{self.dest_names[dst]}"

    def parse_edge(self, text: str) -> tuple[int, int]:
        """``(source, destination)`` indices of an MIB edge name (the inverse of :meth:`edge_name`)."""
        parts = text.split(_EDGE_ARROW) if isinstance(text, str) else []
        if len(parts) != 2:
            raise GraphError(f"cannot parse circuit edge {text!r}; expected '<source>-><destination>', e.g. 'a0.h1->a2.h3<k>'")
        src, dst = self.source_index(Node.parse(parts[0])), self.dest_index(Dest.parse(parts[1]))
        if src >= self.upstream(dst):
            raise GraphError(f"{text} is not an edge: {parts[1]} reads the stream before {parts[0]} writes to it")
        return src, dst

    # ------------------------------------------------------------------ nodes
    @cached_property
    def nodes(self) -> list[Node]:
        """Every node: the sources in index order, then the logits."""
        return self.sources + [Node("logits")]

    def node_index(self, node: Node) -> int:
        """Index in :attr:`nodes` (a source's index; ``n_sources`` for the logits)."""
        return self.n_sources if node.kind == "logits" else self.source_index(node)

    @cached_property
    def node_names(self) -> list[str]:
        return [str(node) for node in self.nodes]

    def node_level(self, node_scores: torch.Tensor) -> torch.Tensor:
        """Edge matrix in which every edge of a source carries that source's node score."""
        return node_scores[:, None].expand(self.n_sources, self.n_dests) * self.allowed

    def _check(self, node: Node) -> None:
        if node.layer is not None and node.layer >= self.n_layers:
            raise GraphError(f"node {node}: layer {node.layer} out of range; the graph has layers 0..{self.n_layers - 1}")
        if node.head is not None and node.head >= self.n_heads:
            raise GraphError(f"node {node}: head {node.head} out of range; the graph has heads 0..{self.n_heads - 1}")

    # ------------------------------------------------------------------ masks
    def empty(self) -> torch.Tensor:
        return torch.zeros(self.n_sources, self.n_dests, dtype=torch.bool)

    def full(self) -> torch.Tensor:
        return self.allowed.clone()

    def check_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[-2:] != (self.n_sources, self.n_dests):
            raise GraphError(
                f"circuit mask has shape {tuple(mask.shape)}; this graph needs [..., {self.n_sources}, {self.n_dests}]"
            )
        return mask.bool() & self.allowed
