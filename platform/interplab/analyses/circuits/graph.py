"""The computational graph circuits are found in.

Sources (nodes that write to the residual stream) are the input embeddings, every attention head
and every MLP. Destinations (nodes that read it) are every head's query, key and value input
(grouped-query heads expanded to query heads), every MLP's input and the logits. An edge joins a
source to every destination that reads the stream after the source wrote to it: heads and MLPs of
earlier layers; within a layer the MLP reads the layer's heads unless the family runs attention and
MLP in parallel. GPT-2 small has 32,491 edges under this rule (``docs/circuits.md`` lists others).

Names follow MIB/EAP-IG: ``input``, ``a3.h5``, ``m3``, ``logits``; destinations ``a3.h5<q>``.
Scores and masks are ``[n_sources, n_destinations]`` matrices; :attr:`CircuitGraph.allowed` says
which entries are edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

QKV = ("q", "k", "v")
Level = Literal["edge", "node"]


class GraphError(ValueError):
    """A model the circuit graph cannot describe, or a malformed circuit."""


@dataclass(frozen=True)
class CircuitGraph:
    """The edge graph of a model with ``n_layers`` layers of ``n_heads`` heads."""

    n_layers: int
    n_heads: int
    parallel: bool = False

    @classmethod
    def of(cls, model) -> CircuitGraph:
        """The graph of a :class:`~interplab.engine.HookedModel` or pipeline model."""
        spec = model.spec
        if spec.qkv is None or spec.ln_mlp is None:
            raise GraphError(
                f"circuit graphs need heads that add to the residual stream one by one; the {spec.name} family "
                "normalises attention and MLP outputs before adding them (post-norm). Supported families: "
                "gpt2, llama, qwen2, gpt_neox"
            )
        return cls(model.n_layers, model.n_heads, parallel=not model.has_resid_mid)

    # ------------------------------------------------------------------ sources
    @property
    def n_sources(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    def head_source(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_source(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    @cached_property
    def source_names(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return names

    @cached_property
    def source_layer(self) -> torch.Tensor:
        """Layer of each source (-1 for the input)."""
        return torch.tensor([-1] + [layer for layer in range(self.n_layers) for _ in range(self.n_heads + 1)])

    # ------------------------------------------------------------------ destinations
    @property
    def n_dests(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    def qkv_dest(self, layer: int, head: int, which: str) -> int:
        return layer * (3 * self.n_heads + 1) + QKV.index(which) * self.n_heads + head

    def mlp_dest(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_dest(self) -> int:
        return self.n_dests - 1

    @cached_property
    def dest_names(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            for which in QKV:
                names += [f"a{layer}.h{h}<{which}>" for h in range(self.n_heads)]
            names.append(f"m{layer}")
        return names + ["logits"]

    @cached_property
    def dest_node(self) -> list[str]:
        """The node each destination belongs to (``a3.h5<q>`` -> ``a3.h5``)."""
        return [name.split("<")[0] for name in self.dest_names]

    @cached_property
    def dest_owner(self) -> torch.Tensor:
        """The source index of the node each destination belongs to (``n_sources`` for the logits)."""
        owner = torch.empty(self.n_dests, dtype=torch.long)
        for layer in range(self.n_layers):
            for h in range(self.n_heads):
                for which in QKV:
                    owner[self.qkv_dest(layer, h, which)] = self.head_source(layer, h)
            owner[self.mlp_dest(layer)] = self.mlp_source(layer)
        owner[self.logits_dest] = self.n_sources
        return owner

    def upstream(self, dest: int) -> int:
        """Number of sources that write before ``dest`` reads (sources ``0..upstream-1``)."""
        if dest == self.logits_dest:
            return self.n_sources
        layer, within = divmod(dest, 3 * self.n_heads + 1)
        first_of_layer = 1 + layer * (self.n_heads + 1)
        if within == 3 * self.n_heads and not self.parallel:
            return first_of_layer + self.n_heads
        return first_of_layer

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
        return f"{self.source_names[src]}->{self.dest_names[dst]}"

    def dest_layer(self, dest: int) -> int:
        """The layer whose forward pass first reads ``dest`` (``n_layers`` for the logits)."""
        return self.n_layers if dest == self.logits_dest else dest // (3 * self.n_heads + 1)

    # ------------------------------------------------------------------ nodes
    @cached_property
    def node_names(self) -> list[str]:
        return self.source_names + ["logits"]

    def node_level(self, node_scores: torch.Tensor) -> torch.Tensor:
        """Edge matrix in which every edge of a source carries that source's node score."""
        return node_scores[:, None].expand(self.n_sources, self.n_dests) * self.allowed

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
