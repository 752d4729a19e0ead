"""Edge scores: EAP, EAP-IG (inputs / activations), clean-corrupted, exact edge patching and ACDC.

Every method returns a ``[n_sources, n_dests]`` matrix (zero off the graph) whose entry estimates
``m(N) - m(N without the edge)``, averaged over the prompt pairs: positive edges support the
behaviour the metric measures. With ``δ_u = c_u - a_u`` (source ``u``'s corrupted minus clean output)
and ``g_v`` the metric's gradient at destination ``v``'s input,

* ``eap``: ``-Σ_pos δ_u · g_v`` with ``g`` at the clean run (one backward pass fills every edge);
* ``eap-ig-inputs``: ``g`` averaged over ``ig_steps`` runs whose input embeddings are
  ``c + (k/steps)(a - c)``, ``k = 0..steps-1`` (Hanna et al. 2024);
* ``eap-ig-activations``: for each layer's attention (all heads), each MLP and the input, ``g``
  averaged over runs in which that node group's outputs are interpolated, ``k = 1..steps``; edges
  out of the group use those gradients (Marks et al.'s IG over activations, per group);
* ``clean-corrupted``: ``g`` averaged over the clean and the corrupted run;
* ``exact``: ``m(N) - m(N \\ {e})``, one patched forward per edge (rows batched);
* ``acdc``: Conmy et al.'s reverse-topological pruning; an edge's score is the increase of the
  ACDC objective when it was tried (``KL(clean || circuit)`` for ``metric: kl``, else ``-m``);
  edges whose score is below the threshold were removed.

Gradient methods run through :meth:`gradients` of a :class:`~interplab.engine.HookedModel` or of a
pipeline model (gradients cross stages there); ``exact`` and ``acdc`` evaluate circuits by edge patching
(:mod:`~interplab.analyses.circuits.evaluate`), on a pipeline stage after stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from interplab.analyses.circuits.evaluate import DEFAULT_MEMORY, rows_per_pass, run_patched
from interplab.analyses.circuits.graph import CircuitGraph
from interplab.analyses.circuits.task import CircuitTask
from interplab.engine.interventions import Intervention
from interplab.engine.sites import Site, SiteKind

GRADIENT_METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations", "clean-corrupted")
METHODS = (*GRADIENT_METHODS, "exact", "acdc")
GRAD_MEMORY = 512 * 2**20  # bytes of destination gradients per pass (15 SmolLM2 rows; larger passes were slower on CPU)
LAYERS_PER_PRODUCT = 4  # destination layers per matrix product when contracting scores


def dest_sites(graph: CircuitGraph) -> list[Site]:
    """The sites holding every destination's input (:attr:`CircuitGraph.dest_groups`)."""
    return list(graph.dest_groups)


def _dest_block(graph: CircuitGraph, grads, layers: range, steps: int) -> torch.Tensor:
    """Gradients at the destinations of ``layers`` (``n_layers`` means the logits), summed over the
    ``steps`` row blocks, as ``[n_block_dests, b * s * d]`` in destination order."""
    parts = []
    for site, dests in graph.dest_groups.items():
        if graph.dest_layer(dests.start) in layers:
            g = grads[site]
            parts.append(g if site.kind.per_head else g[:, :, None])
    g = torch.cat(parts, dim=2).float()
    rows, s, c, d = g.shape
    g = g.reshape(steps, rows // steps, s, c, d).sum(0)
    return g.permute(2, 0, 1, 3).reshape(c, -1)


def _grad_pass(task: CircuitTask, prompt_rows: torch.Tensor, interventions, denominator: int):
    """Metric gradients at every destination input (a cache keyed by :func:`dest_sites`); the metric
    is summed over rows and divided by ``denominator`` (so gradients of several passes add up to a mean)."""
    metric = task.scalar_metric(prompt_rows, sign=len(prompt_rows) / denominator)
    result = task.model.gradients(
        task.pairs.clean.select(prompt_rows), metric, dest_sites(task.graph), interventions=interventions, logits="last"
    )
    return result.grads


def _row_chunks(task: CircuitTask, rows_per_prompt: int, max_rows: int | None) -> Iterator[torch.Tensor]:
    """Prompt indices in chunks so that ``chunk * rows_per_prompt <= max_rows``."""
    if max_rows is None:
        _, s, _, d = task.clean_sources.shape
        # gradients of every destination input dominate: [rows, s, V, d] floats
        max_rows = max(1, GRAD_MEMORY // (s * task.graph.n_dests * d * 4))
    per_chunk = max(1, max_rows // rows_per_prompt)
    for first in range(0, task.n, per_chunk):
        yield torch.arange(first, min(task.n, first + per_chunk))


def _score(task: CircuitTask, prompts: torch.Tensor, grads, src: slice = slice(None)) -> torch.Tensor:
    """``-Σ δ_u · g_v`` over rows and positions (rows of ``grads`` repeat ``prompts`` step-major).

    One matrix product per few destination layers, over the sources upstream of them only (about
    half of all source/destination pairs are not edges), without stacking every gradient at once."""
    graph = task.graph
    first, stop = src.start or 0, graph.n_sources if src.stop is None else src.stop
    delta = (task.corrupt_sources[prompts, :, first:stop] - task.clean_sources[prompts, :, first:stop]).float()
    delta = delta.permute(2, 0, 1, 3).reshape(stop - first, -1)  # [sources, b * s * d]
    steps = grads[next(iter(graph.dest_groups))].shape[0] // len(prompts)
    scores = torch.zeros(stop - first, graph.n_dests)
    for layer in range(0, graph.n_layers + 1, LAYERS_PER_PRODUCT):
        layers = range(layer, min(layer + LAYERS_PER_PRODUCT, graph.n_layers + 1))
        last = graph.layer_dests(layers[-1])
        upstream = max(graph.upstream(d) for d in last)
        if upstream <= first:
            continue
        cols = slice(graph.layer_dests(layer).start, last.stop)
        scores[: upstream - first, cols] = -(delta[: upstream - first] @ _dest_block(graph, grads, layers, steps).T)
    return scores


def eap(task: CircuitTask, max_rows: int | None = None) -> torch.Tensor:
    scores = torch.zeros(task.graph.n_sources, task.graph.n_dests)
    for prompts in _row_chunks(task, 1, max_rows):
        scores += _score(task, prompts, _grad_pass(task, prompts, (), task.n))
    return scores * task.graph.allowed


def _ig_inputs(task: CircuitTask, alphas: list[float], max_rows: int | None) -> torch.Tensor:
    scores = torch.zeros(task.graph.n_sources, task.graph.n_dests)
    denominator = task.n * len(alphas)
    for prompts in _row_chunks(task, len(alphas), max_rows):
        clean, corrupt = task.clean_sources[prompts, :, 0], task.corrupt_sources[prompts, :, 0]
        embeds = torch.cat([corrupt + a * (clean - corrupt) for a in alphas])
        rows = prompts.repeat(len(alphas))
        grads = _grad_pass(task, rows, [Intervention(Site(SiteKind.EMBED), "set", value=embeds)], denominator)
        scores += _score(task, prompts, grads)
    return scores * task.graph.allowed


def eap_ig_inputs(task: CircuitTask, ig_steps: int = 5, max_rows: int | None = None) -> torch.Tensor:
    return _ig_inputs(task, [k / ig_steps for k in range(ig_steps)], max_rows)


def clean_corrupted(task: CircuitTask, max_rows: int | None = None) -> torch.Tensor:
    return _ig_inputs(task, [1.0, 0.0], max_rows)


def eap_ig_activations(task: CircuitTask, ig_steps: int = 5, max_rows: int | None = None) -> torch.Tensor:
    graph = task.graph
    scores = torch.zeros(graph.n_sources, graph.n_dests)
    alphas = [k / ig_steps for k in range(1, ig_steps + 1)]
    denominator = task.n * ig_steps
    for site, sources in graph.source_groups.items():
        src = slice(sources.start, sources.stop)
        for prompts in _row_chunks(task, ig_steps, max_rows):
            clean, corrupt = task.clean_sources[prompts, :, src], task.corrupt_sources[prompts, :, src]
            values = torch.cat([corrupt + a * (clean - corrupt) for a in alphas])
            if not site.kind.per_head:
                values = values[:, :, 0]
            grads = _grad_pass(task, prompts.repeat(ig_steps), [Intervention(site, "set", value=values)], denominator)
            scores[src] += _score(task, prompts, grads, src)
    return scores * graph.allowed


def exact(task: CircuitTask, edges: torch.Tensor | None = None, memory: int = DEFAULT_MEMORY) -> torch.Tensor:
    """``m(N) - m(N \\ {e})`` for every edge (or only ``edges``, ``Long[k, 2]`` source/destination),
    rows grouped by destination layer (latest first) so that most rows skip most layers."""
    graph = task.graph
    edges = graph.edges if edges is None else edges
    layer_of = torch.tensor([graph.dest_layer(int(d)) for d in edges[:, 1]])
    order = torch.argsort(layer_of, descending=True, stable=True)
    n = task.n
    per_pass = max(1, rows_per_pass(task, memory) // n)
    scores = torch.zeros(graph.n_sources, graph.n_dests)
    full = task.clean_value.float()
    for first in range(0, len(order), per_pass):
        chosen = edges[order[first : first + per_pass]]
        patched = torch.zeros(len(chosen), graph.n_sources, graph.n_dests, dtype=torch.bool)
        patched[torch.arange(len(chosen)), chosen[:, 0], chosen[:, 1]] = True
        values = run_patched(task, patched.repeat_interleave(n, dim=0), torch.arange(n).repeat(len(chosen)))
        effect = (full.repeat(len(chosen)) - values.float()).reshape(len(chosen), n).mean(1)
        scores[chosen[:, 0], chosen[:, 1]] = effect
    return scores


@dataclass
class AcdcResult:
    scores: torch.Tensor  # [U, V] objective increase when the edge was tried
    circuit: torch.Tensor  # [U, V] bool: kept edges
    evaluations: int


def acdc(task: CircuitTask, threshold: float, metric: str | None = None) -> AcdcResult:
    """Conmy et al. (2023): visit destinations from the logits backwards, try removing each incoming
    edge (latest source first) and keep it removed when the objective grows by less than ``threshold``."""
    graph = task.graph
    objective_kind = metric or task.metric_name
    prompts = torch.arange(task.n)

    def objective(patched: torch.Tensor) -> float:
        values = run_patched(task, patched[None].expand(task.n, -1, -1), prompts, metric=objective_kind).float()
        return float(values.mean() if objective_kind == "kl" else -values.mean())

    patched = torch.zeros(graph.n_sources, graph.n_dests, dtype=torch.bool)
    scores = torch.zeros(graph.n_sources, graph.n_dests)
    current = objective(patched)
    evaluations = 1
    for dest in reversed(range(graph.n_dests)):
        for src in reversed(range(graph.upstream(dest))):
            patched[src, dest] = True
            value = objective(patched)
            evaluations += 1
            scores[src, dest] = value - current
            if value - current < threshold:
                current = value
            else:
                patched[src, dest] = False
    return AcdcResult(scores, graph.allowed & ~patched, evaluations)


def score_edges(
    task: CircuitTask,
    method: str,
    *,
    ig_steps: int = 5,
    max_rows: int | None = None,
    acdc_threshold: float = 0.01,
    acdc_metric: str | None = None,
) -> torch.Tensor:
    """Scores of ``method`` (one of :data:`METHODS`)."""
    if method == "eap":
        return eap(task, max_rows)
    if method == "eap-ig-inputs":
        return eap_ig_inputs(task, ig_steps, max_rows)
    if method == "eap-ig-activations":
        return eap_ig_activations(task, ig_steps, max_rows)
    if method == "clean-corrupted":
        return clean_corrupted(task, max_rows)
    if method == "exact":
        return exact(task)
    if method == "acdc":
        return acdc(task, acdc_threshold, acdc_metric).scores
    raise ValueError(f"unknown circuit method {method!r}; choose from {', '.join(METHODS)}")
