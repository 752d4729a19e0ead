"""Edge patching: run the model with any set of edges corrupted, many circuits per forward pass.

A destination whose incoming edge from source ``u`` is outside the circuit reads
``c_u - a_u`` added to its input, where ``c_u`` is ``u``'s output on the corrupted prompt and ``a_u``
its output in *this* pass (AutoCircuit's and EAP-IG's convention): the destination sees the
corrupted output of every source outside the circuit and the live output of every source inside it.
Evaluating a circuit therefore costs one forward pass, and rows of one batch can carry different
circuits (``masks[c]`` for circuit ``c``, each applied to every prompt).

The backend's stages run one after another, each receiving the earlier stages' source differences
with the hidden state (:func:`_run_patched_stages`; one stage on the single-process model).

Rows start at the first layer any of their corrupted edges reaches: earlier layers are the clean
run's, so they come from its cached residual stream (exact per-edge patching mostly runs late
layers only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from interplab.analyses.circuits.graph import CircuitGraph
from interplab.analyses.circuits.task import CircuitTask
from interplab.analyses.metrics import get_metric
from interplab.engine.interventions import Intervention
from interplab.engine.sites import Site

DEFAULT_MEMORY = 768 * 2**20  # bytes for the per-row source differences


class _PatchState:
    """Per-pass state: each source's ``c_u - a_u`` as it is computed, and the patch masks.

    Differences are kept as ``[rows, U, s * d]`` so that "sum the chosen sources' differences for
    each destination" is one batched matrix product per destination group, without copies.
    """

    def __init__(self, task: CircuitTask, patched: torch.Tensor, prompt_of_row: torch.Tensor, start: int) -> None:
        graph = task.graph
        self.graph = graph  # no reference to the task or model: the state is sent to pipeline stages
        self.patched = patched  # [rows, U, V] bool: edge corrupted
        self.rows = prompt_of_row
        rows, (_, s, _, d) = len(prompt_of_row), task.clean_sources.shape
        self.s, self.d = s, d
        # every source starts at its corrupted output; ``record`` subtracts the live one in place
        corrupt = task.corrupt_by_source
        self.diff = task.workspace("diff", (rows, *corrupt.shape[1:]), corrupt.dtype)
        torch.index_select(corrupt, 0, prompt_of_row, out=self.diff)
        self.total = torch.zeros(rows, s * d, dtype=self.diff.dtype)
        # sources written before layer `start` are the clean run's (from layer 0 on, all are recorded live)
        first = graph.first_source(start) if start > 0 else 0
        if first:
            clean = task.clean_sources[:, :, :first][prompt_of_row]
            self._subtract(0, clean)
        self.written = first

    def _subtract(self, first: int, value: torch.Tensor) -> None:
        """``diff[:, first:first + count] -= value`` (``value`` ``[rows, s, count, d]``), and update the total."""
        rows, s, count, d = value.shape
        block = self.diff[:, first : first + count]
        block.view(rows, count, s, d).sub_(value.permute(0, 2, 1, 3).to(block.dtype))
        self.total += block.sum(1)

    def record(self, first: int, count: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``apply`` fn for a source site covering sources ``first..first+count-1``."""

        def fn(x: torch.Tensor) -> torch.Tensor:
            self._subtract(first, x if x.ndim == 4 else x[:, :, None])
            self.written = first + count
            return x

        return fn

    def _added(self, cols: list[int], up: int) -> torch.Tensor | None:
        """``[rows, s, len(cols), d]``: what the destinations ``cols`` (all reading ``up`` sources) get added."""
        mask = self.patched[:, :up, cols]  # [rows, up, c]
        if not bool(mask.any()):
            return None
        kept = ~mask
        n_kept, n_mask = int(kept.any(dim=(0, 2)).sum()), int(mask.any(dim=(0, 2)).sum())
        use_kept = n_kept < n_mask
        chosen = kept if use_kept else mask
        n_chosen = min(n_kept, n_mask)
        dtype = self.diff.dtype
        if n_chosen == 0:
            part = None
        elif n_chosen * 4 < up:  # few sources involved: gather them
            idx = chosen.any(dim=(0, 2)).nonzero(as_tuple=True)[0]
            part = torch.bmm(chosen[:, idx].transpose(1, 2).to(dtype), self.diff[:, idx])
        else:
            part = torch.bmm(chosen.transpose(1, 2).to(dtype), self.diff[:, :up])
        if use_kept:
            total = self.total
            if self.written > up:
                total = total - self.diff[:, up : self.written].sum(1)
            out = total[:, None].expand(-1, len(cols), -1) if part is None else total[:, None] - part
        elif part is None:  # not reached: without use_kept, n_chosen == n_mask > 0
            raise RuntimeError(f"edge patching chose no corrupted source for destinations {cols}")
        else:
            out = part
        rows = out.shape[0]
        return out.reshape(rows, len(cols), self.s, self.d).transpose(1, 2)

    def dest(self, cols: list[int], up: int, per_head: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(x: torch.Tensor) -> torch.Tensor:
            added = self._added(cols, up)
            if added is None:
                return x
            return x + (added if per_head else added[:, :, 0]).to(x.dtype)

        return fn


def _from(site: Site, layer: int) -> bool:
    """Whether a source site is written at or after ``layer`` (the embedding: only from layer 0)."""
    return site.layer >= layer if site.layer is not None else layer == 0


def _interventions(state: _PatchState, start: int) -> list[Intervention]:
    """Record every source from layer ``start`` on and feed every destination its patched input."""
    graph = state.graph
    out = []
    for site, r in graph.source_groups.items():
        if _from(site, start):
            out.append(Intervention(site, "apply", fn=state.record(r.start, len(r))))
    for site, r in graph.dest_groups.items():
        if site.layer is not None and site.layer >= start:
            out.append(Intervention(site, "apply", fn=state.dest(list(r), graph.upstream(r.start), site.kind.per_head)))
    return out


def _first_layer(graph: CircuitGraph, patched: torch.Tensor) -> int:
    """The first layer any row's corrupted edge reaches."""
    dests = patched.any(dim=(0, 1)).nonzero(as_tuple=True)[0]
    if len(dests) == 0:
        return graph.n_layers
    return min(graph.dest_layer(int(d)) for d in dests)


@torch.no_grad()
def run_patched(task: CircuitTask, patched: torch.Tensor, prompt_of_row: torch.Tensor, metric: str | None = None) -> torch.Tensor:
    """Metric per row with ``patched[r]`` (bool ``[U, V]``: corrupted edges) on prompt ``prompt_of_row[r]``
    (``metric`` overrides the task's, e.g. ``"kl"``)."""
    graph = task.graph
    patched = graph.check_mask(patched)
    # the logits read the last layer's output, so at least the last layer runs
    start = min(_first_layer(graph, patched), graph.n_layers - 1)
    batch = task.pairs.clean.select(prompt_of_row)
    logits = _run_patched_stages(task, patched, prompt_of_row, start, batch)
    fn = get_metric(metric) if metric else task.metric
    return fn(logits.float(), task.inputs(prompt_of_row))


def _run_patched_stages(task: CircuitTask, patched: torch.Tensor, prompt_of_row: torch.Tensor, start: int, batch) -> torch.Tensor:
    """Edge patching stage after stage, from layer ``start`` in the stage holding it.

    Each stage gets the hidden state and the patch state (every earlier source's difference) with
    its interventions, which may run in another process (a pipeline's stage actor). A stage returns
    its output and, when a later stage follows, its sources' live outputs, whose differences the
    driver adds to its own copy of the state before the next stage. One stage (the single-process
    model) is one forward pass; a pipeline adds sending the differences (``rows x sources x
    positions x d_model``) to each stage."""
    model, graph = task.model, task.graph
    ranges = model.stage_ranges
    first_stage = model.stage_of(Site("resid_pre", start))
    state = _PatchState(task, patched, prompt_of_row, start)
    hidden = task.clean_resid[start][prompt_of_row] if start > 0 else None
    for index in range(first_stage, len(ranges)):
        a, b = ranges[index]
        lo = start if index == first_stage else a
        later = index < len(ranges) - 1
        sources = [site for site in graph.source_groups if later and _from(site, lo) and (site.layer or 0) < b]
        items = [x for x in _interventions(state, start) if model.stage_of(x.site) == index]
        hidden, cache = model.stage_forward(index, batch, hidden, start=lo, capture=sources, interventions=items, logits="last")
        for site in sources:  # what the stage recorded in its own copy of the state
            first, count = _source_range(graph, site)
            state.record(first, count)(cache[site])
    if hidden is None:
        raise RuntimeError(f"no backend stage ran from layer {start}; stage ranges {ranges}")
    return hidden


def _source_range(graph: CircuitGraph, site: Site) -> tuple[int, int]:
    r = graph.source_groups[site]
    return r.start, len(r)


def rows_per_pass(task: CircuitTask, memory: int = DEFAULT_MEMORY) -> int:
    _, s, n_src, d = task.clean_sources.shape
    per_row = s * n_src * d * task.clean_sources.element_size() * 2
    return max(1, memory // per_row)


def evaluate(task: CircuitTask, circuits: torch.Tensor, *, memory: int = DEFAULT_MEMORY) -> torch.Tensor:
    """Mean metric over the prompts for each circuit (bool ``[C, U, V]`` or ``[U, V]``: edges kept)."""
    graph = task.graph
    single = circuits.ndim == 2
    circuits = graph.check_mask(circuits[None] if single else circuits)
    n = task.n
    chunk = max(1, rows_per_pass(task, memory) // n)  # circuits per pass
    values = []
    for first in range(0, len(circuits), chunk):
        part = circuits[first : first + chunk]
        patched = (graph.allowed & ~part).repeat_interleave(n, dim=0)
        prompt_of_row = torch.arange(n).repeat(len(part))
        values.append(run_patched(task, patched, prompt_of_row).reshape(len(part), n).mean(1))
    out = torch.cat(values)
    return out[0] if single else out
