"""Edge patching: run the model with any set of edges corrupted, many circuits per forward pass.

A destination whose incoming edge from source ``u`` is outside the circuit reads
``c_u - a_u`` added to its input, where ``c_u`` is ``u``'s output on the corrupted prompt and ``a_u``
its output in *this* pass (AutoCircuit's and EAP-IG's convention): the destination sees the
corrupted output of every source outside the circuit and the live output of every source inside it.
Evaluating a circuit therefore costs one forward pass, and rows of one batch can carry different
circuits (``masks[c]`` for circuit ``c``, each applied to every prompt).

On a pipeline model the stages run one after another, each receiving the earlier stages' source
differences with the hidden state (:func:`_run_patched_stages`).

Rows start at the first layer any of their corrupted edges reaches: earlier layers are the clean
run's, so they come from its cached residual stream (exact per-edge patching mostly runs late
layers only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from interplab.analyses.circuits.graph import QKV, CircuitGraph
from interplab.analyses.circuits.task import CircuitTask
from interplab.analyses.metrics import get_metric
from interplab.engine.hooked import HookedModel
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
        rows, (_, s, n_src, d) = len(prompt_of_row), task.clean_sources.shape
        self.s, self.d = s, d
        # every source starts at its corrupted output; ``record`` subtracts the live one in place
        corrupt = task.corrupt_by_source
        self.diff = task.workspace("diff", (rows, *corrupt.shape[1:]), corrupt.dtype)
        torch.index_select(corrupt, 0, prompt_of_row, out=self.diff)
        self.total = torch.zeros(rows, s * d, dtype=self.diff.dtype)
        # sources written before layer `start` are the clean run's (from layer 0 on, all are recorded live)
        first = 1 + start * (graph.n_heads + 1) if start > 0 else 0
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


def _interventions(state: _PatchState, start: int) -> list[Intervention]:
    graph = state.graph
    out = []
    if start == 0:
        out.append(Intervention("embed", "apply", fn=state.record(0, 1)))
    for layer in range(start, graph.n_layers):
        for which in QKV:
            cols = [graph.qkv_dest(layer, h, which) for h in range(graph.n_heads)]
            out.append(Intervention(f"{which}_in.{layer}", "apply", fn=state.dest(cols, graph.upstream(cols[0]), True)))
        out.append(Intervention(f"head_out.{layer}", "apply", fn=state.record(graph.head_source(layer, 0), graph.n_heads)))
        mlp = graph.mlp_dest(layer)
        out.append(Intervention(f"mlp_in.{layer}", "apply", fn=state.dest([mlp], graph.upstream(mlp), False)))
        out.append(Intervention(f"mlp_out.{layer}", "apply", fn=state.record(graph.mlp_source(layer), 1)))
    logits = graph.logits_dest
    out.append(Intervention(f"resid_post.{graph.n_layers - 1}", "apply", fn=state.dest([logits], graph.upstream(logits), False)))
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
    if isinstance(task.model, HookedModel):
        state = _PatchState(task, patched, prompt_of_row, start)
        hidden = task.clean_resid[start][prompt_of_row] if start > 0 else None
        logits, _ = task.model.run_stage(batch, start=start, stop=graph.n_layers, hidden=hidden, with_head=True,
                                         interventions=_interventions(state, start), logits="last")
    else:
        logits = _run_patched_stages(task, patched, prompt_of_row, start, batch)
    fn = get_metric(metric) if metric else task.metric
    return fn(logits.float(), task.inputs(prompt_of_row))


def _run_patched_stages(task: CircuitTask, patched: torch.Tensor, prompt_of_row: torch.Tensor, start: int, batch) -> torch.Tensor:
    """Edge patching on a pipeline, one stage after another from the stage holding layer ``start``.

    Each stage gets the hidden state and the patch state (every earlier source's difference) and
    returns its output and its sources' live outputs; the driver adds their differences to the state
    before the next stage. Stages run in turn on one batch, so this costs a forward pass plus sending
    the differences (``rows x sources x positions x d_model``) to each stage."""
    model, graph = task.model, task.graph
    first_stage = model.stage_of(Site("resid_pre", start))
    lo = model.stage_ranges[first_stage][0]
    state = _PatchState(task, patched, prompt_of_row, lo)
    hidden = task.clean_resid[lo][prompt_of_row] if lo > 0 else None
    for index in range(first_stage, model.n_stages):
        a, b = model.stage_ranges[index]
        sources = ([Site("embed")] if index == 0 else []) + [Site(kind, layer) for layer in range(a, b) for kind in ("head_out", "mlp_out")]
        items = [x for x in _interventions(state, lo) if model.stage_of(x.site) == index]
        hidden, cache = model.stage_forward(index, batch, hidden, capture=sources, interventions=items, logits="last")
        for site in sources:  # what the stage recorded in its own copy of the state
            first, count = _source_range(graph, site)
            state.record(first, count)(cache[site])
    return hidden


def _source_range(graph: CircuitGraph, site: Site) -> tuple[int, int]:
    if site.kind.value == "embed":
        return 0, 1
    if site.kind.value == "head_out":
        return graph.head_source(site.layer, 0), graph.n_heads
    return graph.mlp_source(site.layer), 1


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
