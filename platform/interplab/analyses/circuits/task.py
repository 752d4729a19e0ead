"""A circuit-discovery task: prompt pairs, a metric and the activations every method starts from.

:func:`prepare` runs the clean and the corrupted prompts once, capturing every source's output
(``embed``, ``head_out.L``, ``mlp_out.L``) and the clean residual stream; scoring and evaluation
reuse them. Works on a :class:`~interplab.engine.HookedModel` and on a pipeline model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from interplab.analyses.circuits.graph import CircuitGraph
from interplab.analyses.metrics import MetricInputs, get_metric
from interplab.analyses.tasks.pairs import PairSet
from interplab.engine.backend import Backend
from interplab.engine.sites import Site

RowMetric = Callable[[torch.Tensor, MetricInputs], torch.Tensor]


def source_sites(graph: CircuitGraph) -> list[Site]:
    return list(graph.source_groups)


def stack_sources(graph: CircuitGraph, cache) -> torch.Tensor:
    """``[b, s, n_sources, d]`` from a cache holding :func:`source_sites`."""
    return torch.cat([cache[s] if s.kind.per_head else cache[s][:, :, None] for s in graph.source_groups], dim=2)


@dataclass
class CircuitTask:
    """Everything a scoring or evaluation method needs about one set of prompt pairs."""

    model: Backend
    graph: CircuitGraph
    pairs: PairSet
    metric_name: str
    clean_sources: torch.Tensor  # [n, s, U, d]
    corrupt_sources: torch.Tensor  # [n, s, U, d]
    clean_resid: list[torch.Tensor]  # resid_pre of every layer, then the final residual: L + 1 x [n, s, d]
    clean_logprobs: torch.Tensor  # [n, vocab] at each prompt's last position
    clean_value: torch.Tensor  # [n] metric of the full model
    corrupt_value: torch.Tensor  # [n] metric with every edge corrupted

    @functools.cached_property
    def corrupt_by_source(self) -> torch.Tensor:
        """``[n, U, s * d]``: the corrupted outputs laid out for edge patching (one copy, made once)."""
        n, s, u, d = self.corrupt_sources.shape
        return self.corrupt_sources.permute(0, 2, 1, 3).reshape(n, u, s * d)

    def workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer kept between calls (uninitialised): repeated evaluation passes reuse the same
        memory instead of faulting in hundreds of fresh megabytes each time."""
        spaces = self.__dict__.setdefault("_workspaces", {})
        buf = spaces.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            spaces[name] = buf = torch.empty(shape, dtype=dtype)
        return buf

    @property
    def metric(self) -> RowMetric:
        return get_metric(self.metric_name)

    def inputs(self, prompt_rows: torch.Tensor | None = None) -> MetricInputs:
        full = MetricInputs(self.pairs.answer, self.pairs.wrong, self.clean_logprobs)
        return full if prompt_rows is None else full.select(prompt_rows)

    @property
    def n(self) -> int:
        return self.pairs.size

    def scalar_metric(self, prompt_rows: torch.Tensor, sign: float = 1.0):
        """``metric(logits, batch) -> scalar`` (mean over rows) for gradient passes over ``prompt_rows``."""
        inputs = self.inputs(prompt_rows)
        metric = self.metric

        def fn(logits: torch.Tensor, batch) -> torch.Tensor:
            last = logits if logits.ndim == 2 else logits[torch.arange(logits.shape[0]), batch.last_positions().to(logits.device)]
            return sign * metric(last.float(), inputs).mean()

        return fn


def prepare(model, pairs: PairSet, metric: str = "logit_diff", graph: CircuitGraph | None = None) -> CircuitTask:
    """Run the clean and corrupted prompts once and keep what every method needs."""
    graph = graph or CircuitGraph.of(model)
    get_metric(metric)  # fail early with the list of metrics
    if pairs.clean.seq_len != pairs.corrupted.seq_len or not bool((pairs.clean.lengths == pairs.corrupted.lengths).all()):
        raise ValueError("circuit discovery needs clean and corrupted prompts of equal token length, pair by pair")
    sources = source_sites(graph)
    resid = [Site("resid_pre", layer) for layer in range(graph.n_layers)] + [Site("resid_post", graph.n_layers - 1)]
    with torch.no_grad():
        clean = model.run(pairs.clean, capture=sources + resid, logits="last")
        corrupt = model.run(pairs.corrupted, capture=sources, logits="last")
    clean_logprobs = clean.logits.float().log_softmax(-1)
    inputs = MetricInputs(pairs.answer, pairs.wrong, clean_logprobs)
    fn = get_metric(metric)
    return CircuitTask(
        model=model,
        graph=graph,
        pairs=pairs,
        metric_name=metric,
        clean_sources=stack_sources(graph, clean.cache),
        corrupt_sources=stack_sources(graph, corrupt.cache),
        clean_resid=[clean.cache[s] for s in resid],
        clean_logprobs=clean_logprobs,
        clean_value=fn(clean.logits.float(), inputs),
        corrupt_value=fn(corrupt.logits.float(), inputs),
    )
