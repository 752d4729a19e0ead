"""Merged rows that share a prompt compute what they share once, in the same forward pass.

A row whose interventions all act at layers ``>= J`` and positions ``>= P`` computes exactly what
the plain (unintervened) run of its prompt computes below layer ``J``, and (causal attention) at
positions before ``P`` at every layer. When several rows of a merged batch share a prompt (many
people patching the same prompt, or one sweep sent as many requests), :func:`shared_pass` runs the
prompt once from the embedding (a *base* row: one of the rows without interventions, or one more
row) and the patched rows *fork* from it just before their first intervened layer:

- for ``logits="last"`` passes of ``set``/``add``/``scale`` interventions, as a packed pass
  (:mod:`interplab.engine.packed`): a forked row computes only its positions from its first
  intervened one on, attending to the base row's earlier positions, and no row computes padding;
- otherwise as whole-row :class:`~interplab.engine.plan.Fork` joins of ``run_stage``.

Either way the weights are read once per layer, as in the plain merged pass. Each row gets the
values its own run computes, up to the float rounding of different batch shapes, as with any
merged pass. It applies to passes without captures whose interventions act at layer-indexed stream
sites (``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``, ``mlp_in``, ``mlp_post``) on a
single-process model, to the prompts where it saves work: a prompt's rows fork when the token-layers
they skip outnumber those of the extra base row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from interplab.engine.backend import Backend
from interplab.engine.cache import ActivationCache
from interplab.engine.hooked import HookedModel
from interplab.engine.interventions import Intervention, as_long
from interplab.engine.packed import PACKED_KINDS, PACKED_MAX_TOKENS, PackedFork, run_packed
from interplab.engine.plan import Fork, resolve_positions
from interplab.engine.results import RunResult

if TYPE_CHECKING:
    from interplab.serve.batching import RunCall


@dataclass(frozen=True)
class ForkPlan:
    """The pass's rows in order: first those that start at the embedding (``starting``: merged rows,
    or ``-1 - r`` for an extra base row with merged row r's tokens), then the forked merged rows
    (``forked``, by join layer), each with its base's index in ``starting``, join layer and first
    computed position."""

    starting: list[int]
    forked: list[tuple[int, PackedFork]]

    def token_rows(self) -> list[int]:
        """The merged row whose tokens each starting row holds (an extra base row: a copy's)."""
        return [r if r >= 0 else -1 - r for r in self.starting]

    def tokens(self, lengths: torch.Tensor) -> int:
        """The tokens of the pass packed (each row's from its first computed position on)."""
        own = sum(int(lengths[r]) for r in self.token_rows())
        return own + sum(int(lengths[r]) - fork.start for r, fork in self.forked)

    def local(self) -> dict[int, int]:
        """Merged row -> its index in the pass."""
        rows = self.starting + [r for r, _ in self.forked]
        return {r: i for i, r in enumerate(rows) if r >= 0}


def shared_pass(model: Backend, call: RunCall) -> RunResult | None:
    """The merged call's result with shared prompts' common layers (and, packed, positions)
    computed once, or None when that does not apply or would not save work (see the module docstring)."""
    if not isinstance(model, HookedModel) or call.capture or call.keep_kv or call.logits not in ("last", "all"):
        return None
    if not call.interventions or any(
        i.site.kind not in PACKED_KINDS or i.site.layer is None or i.rows is None for i in call.interventions
    ):
        return None
    layers, positions = _firsts(call, model.n_layers)
    if call.logits == "last" and all(i.op != "apply" for i in call.interventions):
        plan = _fork_plan(call, model.n_layers, layers, positions)
        if plan is not None and plan.tokens(call.batch.lengths) <= PACKED_MAX_TOKENS:
            return _run_packed(model, call, plan)
    plan = _fork_plan(call, model.n_layers, layers, torch.zeros_like(positions))  # whole rows fork
    return _run(model, call, plan) if plan is not None else None


def _firsts(call: RunCall, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Long[b]`` each: each row's first intervened layer (``n_layers`` for rows without
    interventions) and first intervened position."""
    batch = call.batch
    layer = torch.full((batch.size,), n_layers, dtype=torch.long)
    position = torch.full((batch.size,), batch.seq_len, dtype=torch.long)
    for item in call.interventions:
        named = as_long(item.rows)
        if named is None:  # refused by shared_pass
            continue
        layer.scatter_reduce_(0, named, torch.full_like(named, int(item.site.layer)), reduce="amin")  # type: ignore[arg-type]
        wanted = as_long(item.positions)
        if wanted is None:
            first = torch.zeros_like(named)
        elif item.paired:
            first = torch.where(wanted < 0, batch.lengths[named] + wanted, wanted)
        else:
            grid = wanted[None, :].expand(len(named), -1)
            first = torch.where(grid < 0, batch.lengths[named, None] + grid, grid).amin(dim=1)
        position.scatter_reduce_(0, named, first.clamp(min=0), reduce="amin")
    return layer, position.minimum(batch.lengths - 1)


def _fork_plan(call: RunCall, n_layers: int, layers: torch.Tensor, positions: torch.Tensor) -> ForkPlan | None:
    """Which rows fork from which base (see :class:`ForkPlan`), or None if no prompt gains by it."""
    batch = call.batch
    prompts: dict[bytes, list[int]] = {}
    for r in range(batch.size):
        prompts.setdefault(batch.input_ids[r, : int(batch.lengths[r])].numpy().tobytes(), []).append(r)
    starting: list[int] = []
    forks: list[tuple[int, int]] = []  # (merged row, its base's entry in starting)
    for rows in prompts.values():
        length = int(batch.lengths[rows[0]])
        plain = [r for r in rows if int(layers[r]) >= n_layers]
        base = plain[0] if plain else None
        patched = [r for r in rows if r != base]
        # token-layers a forked row skips: every position below its layer, the early positions above
        skipped = sum(length * int(layers[r]) + (n_layers - int(layers[r])) * int(positions[r]) for r in patched)
        if len(rows) < 2 or skipped <= (0 if base is not None else n_layers * length):
            starting += rows
            continue
        starting.append(base if base is not None else -1 - rows[0])
        forks += [(r, len(starting) - 1) for r in patched]
    if not forks:
        return None
    forks.sort(key=lambda f: (min(int(layers[f[0]]), n_layers - 1), f[0]))
    # a row without interventions (a second copy of the base) joins at the last layer
    forked = [(r, PackedFork(base, min(int(layers[r]), n_layers - 1), int(positions[r]))) for r, base in forks]
    return ForkPlan(starting, forked)


def _pass_interventions(call: RunCall, local: dict[int, int]) -> tuple[Intervention, ...]:
    """The call's interventions with rows renumbered to the pass's order."""
    return tuple(
        dataclasses.replace(item, rows=torch.tensor([local[int(r)] for r in as_long(item.rows)]))  # type: ignore[union-attr]
        for item in call.interventions
    )


def _run_packed(model: HookedModel, call: RunCall, plan: ForkPlan) -> RunResult:
    batch = call.batch.select(torch.tensor(plan.token_rows()))
    logits = run_packed(model, batch, [f for _, f in plan.forked], _pass_interventions(call, plan.local()))
    return _result(call, plan, logits)


def _run(model: HookedModel, call: RunCall, plan: ForkPlan) -> RunResult:
    joins: dict[int, list[int]] = {}
    for _, fork in plan.forked:
        joins.setdefault(fork.layer, []).append(fork.base)
    output, _ = model.run_stage(
        call.batch.select(torch.tensor(plan.token_rows() + [r for r, _ in plan.forked])),
        start=0,
        stop=model.n_layers,
        with_head=True,
        interventions=_pass_interventions(call, plan.local()),
        logits=call.logits,
        joins={layer: Fork(torch.tensor(rows)) for layer, rows in joins.items()},
    )
    return _result(call, plan, output)


def _result(call: RunCall, plan: ForkPlan, output: torch.Tensor) -> RunResult:
    """The merged call's result from the pass's output (rows in the pass's order)."""
    local = plan.local()
    logits = output[torch.tensor([local[r] for r in range(call.batch.size)])]
    positions, valid = resolve_positions(call.positions, call.batch.lengths, call.batch.seq_len)
    return RunResult(logits, ActivationCache({}, positions, valid), call.batch)
