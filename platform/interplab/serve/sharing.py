"""Merged rows that share a prompt compute what they share once, in the same forward pass.

A row whose interventions all act at layers ``>= J`` computes exactly what the plain
(unintervened) run of its prompt computes below layer ``J``. When several rows of a merged batch
share a prompt (many people patching the same prompt, or one sweep sent as many requests),
:func:`shared_pass` runs the prompt once from the embedding (a *base* row: one of the rows without
interventions, or one more row) and the patched rows *fork* from it just before their first
intervened layer (:class:`~interplab.engine.plan.Fork` joins of ``run_stage``): layers below a
row's patch are computed once per prompt instead of once per row, and the weights are read once, as
in the plain merged pass.

Each row gets the values its own run computes, up to the float rounding of different batch sizes,
as with any merged pass (the fork copies the base row's activation bit for bit). It applies to passes
without captures whose interventions act at layer-indexed stream sites (``resid_pre``,
``resid_post``, ``attn_out``, ``mlp_out``, ``mlp_in``, ``mlp_post``) on a single-process model, to
the prompts where it saves layers: a prompt's rows fork when the layers they skip (the sum of their
first intervened layers) outnumber the layers of the extra base row.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from interplab.engine.backend import Backend
from interplab.engine.cache import ActivationCache
from interplab.engine.hooked import HookedModel
from interplab.engine.interventions import as_long
from interplab.engine.plan import Fork, resolve_positions
from interplab.engine.results import RunResult
from interplab.engine.sites import SiteKind

if TYPE_CHECKING:
    from interplab.serve.batching import RunCall

# kinds at one layer's residual stream or MLP/attention output: a row changed there first joins at that layer
STREAM_KINDS = frozenset(
    {SiteKind.RESID_PRE, SiteKind.RESID_POST, SiteKind.ATTN_OUT, SiteKind.MLP_OUT, SiteKind.MLP_POST, SiteKind.MLP_IN}
)


def shared_pass(model: Backend, call: RunCall) -> RunResult | None:
    """The merged call's result with shared prompts' common layers computed once, or None when that
    does not apply or would not save work (see the module docstring)."""
    if not isinstance(model, HookedModel) or call.capture or call.keep_kv or call.logits not in ("last", "all"):
        return None
    if not call.interventions or any(
        i.site.kind not in STREAM_KINDS or i.site.layer is None or i.rows is None for i in call.interventions
    ):
        return None
    plan = _fork_plan(call, model.n_layers)
    if plan is None:
        return None
    order, base_of, n_start = plan
    return _run(model, call, order, base_of, n_start)


def _first_layers(call: RunCall, n_layers: int) -> torch.Tensor:
    """``Long[b]``: each row's first intervened layer (``n_layers`` for rows without interventions)."""
    join = torch.full((call.batch.size,), n_layers, dtype=torch.long)
    for item in call.interventions:
        named = as_long(item.rows)
        join.scatter_reduce_(0, named, torch.full_like(named, int(item.site.layer)), reduce="amin")  # type: ignore[arg-type]
    return join


def _fork_plan(call: RunCall, n_layers: int) -> tuple[list[tuple[int, int]], dict[int, int], int] | None:
    """The pass's rows in order, as ``(merged row, layer it joins at)``: first the rows that start at
    the embedding (unforked rows and base rows; a base row that is not a merged row is ``-1 - r``,
    a copy of merged row r's tokens), then the forked rows by layer; ``base_of``: forked merged row
    -> its base's index in that order; and how many rows start at the embedding."""
    batch = call.batch
    join = _first_layers(call, n_layers)
    prompts: dict[bytes, list[int]] = {}
    for r in range(batch.size):
        prompts.setdefault(batch.input_ids[r, : int(batch.lengths[r])].numpy().tobytes(), []).append(r)
    starting: list[int] = []
    forks: list[tuple[int, int]] = []  # (merged row, its base's entry in starting)
    for rows in prompts.values():
        plain = [r for r in rows if int(join[r]) >= n_layers]
        base = plain[0] if plain else None
        patched = [r for r in rows if r != base]
        skipped = sum(int(join[r]) for r in patched)
        if len(rows) < 2 or skipped <= (0 if base is not None else n_layers):
            starting += rows
            continue
        starting.append(base if base is not None else -1 - rows[0])
        forks += [(r, len(starting) - 1) for r in patched]
    if not forks:
        return None
    forks.sort(key=lambda f: (min(int(join[f[0]]), n_layers - 1), f[0]))
    order = [(r, 0) for r in starting] + [(r, min(int(join[r]), n_layers - 1)) for r, _ in forks]
    return order, {r: base for r, base in forks}, len(starting)


def _run(model: HookedModel, call: RunCall, order: list[tuple[int, int]], base_of: dict[int, int], n_start: int) -> RunResult:
    batch, n_layers = call.batch, model.n_layers
    tokens = torch.tensor([r if r >= 0 else -1 - r for r, _ in order])
    local = {r: i for i, (r, _) in enumerate(order) if r >= 0}
    joins: dict[int, list[int]] = {}
    for r, layer in order[n_start:]:
        joins.setdefault(layer, []).append(base_of[r])
    interventions = tuple(
        dataclasses.replace(item, rows=torch.tensor([local[int(r)] for r in as_long(item.rows)]))  # type: ignore[union-attr]
        for item in call.interventions
    )
    output, _ = model.run_stage(
        batch.select(tokens),
        start=0,
        stop=n_layers,
        with_head=True,
        interventions=interventions,
        logits=call.logits,
        joins={layer: Fork(torch.tensor(rows)) for layer, rows in joins.items()},
    )
    logits = output[torch.tensor([local[r] for r in range(batch.size)])]
    positions, valid = resolve_positions(call.positions, batch.lengths, batch.seq_len)
    return RunResult(logits, ActivationCache({}, positions, valid), batch)
