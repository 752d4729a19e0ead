"""Packed passes: the rows' tokens end to end in one sequence, and forked rows compute only what changes.

A plain pass pads its rows to the longest and computes every position of every row at every layer.
A *packed* pass lays the rows' real tokens end to end in one sequence ``[1, N, d]``: the token-wise
parts of each layer (norms, projections, MLP) run once over the N tokens, attention gets a mask that
keeps each token to its own row's earlier tokens, and each token's rotary angle (or learned position
embedding) comes from its position in its own row.

A row may also *fork* from another (:class:`PackedFork`). A row that equals row ``base`` except at
layers ``>= layer`` and positions ``>= start`` (a patch there: causal attention keeps the positions
before ``start`` equal at every layer) joins the sequence just before ``layer`` as a copy of the
base row's positions ``start..`` only. Its tokens attend to the base row's tokens before ``start``
and to its own from ``start`` on. This is :class:`~interplab.engine.plan.Fork` (which copies whole
rows) cut down to the positions that differ: a single-position patch at position p of an s-token
prompt computes ``s - p`` positions from its layer on, not s at every layer.

Interventions address the unpacked rows (the batch's rows, then the forks in order) and positions,
as in any pass; :func:`run_packed` re-addresses them into the sequence. The attention mask is
``N x N``, so a packed pass suits up to a few thousand tokens (:data:`PACKED_MAX_TOKENS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from interplab.engine import runner
from interplab.engine.hooked import HookedModel
from interplab.engine.interventions import Intervention, InterventionError, as_long
from interplab.engine.plan import HookPlan
from interplab.engine.sites import SiteKind
from interplab.engine.tokens import TokenBatch

# sites whose interventions re-address into a packed sequence: token-wise, per layer, without heads
PACKED_KINDS = frozenset(
    {SiteKind.RESID_PRE, SiteKind.RESID_POST, SiteKind.ATTN_OUT, SiteKind.MLP_OUT, SiteKind.MLP_POST, SiteKind.MLP_IN}
)
# the most tokens a packed pass should hold (its attention mask is N x N)
PACKED_MAX_TOKENS = 2048


@dataclass(frozen=True)
class PackedFork:
    """A row equal to batch row ``base`` below ``layer`` and before position ``start``: it joins just
    before ``layer`` with the base row's positions ``start..`` (see the module docstring)."""

    base: int
    layer: int
    start: int


@dataclass(frozen=True)
class Layout:
    """Where each row's computed positions lie in the sequence: row r holds positions
    ``starts[r]..lengths[r]-1`` at indices ``offsets[r]..``; ``present[l]`` tokens exist at layer l."""

    offsets: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    bases: torch.Tensor  # each row's base row, -1 for the batch's own rows
    joins: torch.Tensor  # the layer each row joins at (0 for the batch's own rows)
    present: list[int]

    @property
    def size(self) -> int:
        return int((self.lengths - self.starts).sum())

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's row and position, ``Long[N]`` each."""
        counts = self.lengths - self.starts
        row = torch.repeat_interleave(torch.arange(len(counts)), counts)
        return row, torch.arange(int(counts.sum())) - self.offsets[row] + self.starts[row]

    def index(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Sequence index of each (row, position) pair, -1 where the sequence does not hold it
        (padding); a position before a fork's start is refused (it is the base row's)."""
        early = positions < self.starts[rows]
        if early.any():
            row = int(rows[early][0])
            raise InterventionError(
                f"row {row} forks at position {int(self.starts[row])}, so it cannot be changed at position "
                f"{int(positions[early][0])}: fork it from an earlier position"
            )
        held = positions < self.lengths[rows]
        return torch.where(held, self.offsets[rows] + positions - self.starts[rows], -1)


def layout(batch: TokenBatch, forks: Sequence[PackedFork], n_layers: int) -> Layout:
    """The sequence's layout, or one clear error for forks that cannot run."""
    b = batch.size
    previous = 0
    for i, fork in enumerate(forks):
        if not 0 <= fork.base < b:
            raise ValueError(f"forks[{i}].base {fork.base}: a fork copies one of the batch's rows 0..{b - 1}")
        if not previous <= fork.layer < n_layers:
            raise ValueError(f"forks[{i}].layer {fork.layer}: forks join in layer order, at layers {previous}..{n_layers - 1}")
        if not 0 <= fork.start < int(batch.lengths[fork.base]):
            raise ValueError(
                f"forks[{i}].start {fork.start}: row {fork.base} has {int(batch.lengths[fork.base])} tokens to fork from"
            )
        previous = fork.layer
    lengths = batch.lengths.cpu().long()

    def per_row(own: int, values: list[int]) -> torch.Tensor:
        """``own`` for each of the batch's rows, then ``values`` for the forks."""
        return torch.cat([torch.full((b,), own, dtype=torch.long), torch.tensor(values, dtype=torch.long)])

    bases = per_row(-1, [f.base for f in forks])
    all_lengths = torch.cat([lengths, lengths[bases[b:]]])
    starts = per_row(0, [f.start for f in forks])
    counts = all_lengths - starts
    offsets = torch.cumsum(counts, 0) - counts
    present = [
        int(lengths.sum()) + sum(int(counts[b + i]) for i, f in enumerate(forks) if f.layer <= layer) for layer in range(n_layers)
    ]
    return Layout(offsets, starts, all_lengths, bases, per_row(0, [f.layer for f in forks]), present)


def _masks(hooked: HookedModel, lay: Layout, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Additive masks ``[1, 1, N, N]`` per attention kind: a token sees its own row's tokens up to
    its position and, in a fork, the base row's tokens before the fork's start."""
    row, pos = lay.tokens()
    own = (row[None, :] == row[:, None]) & (pos[None, :] <= pos[:, None])
    base = lay.bases[row]
    shared = (row[None, :] == base[:, None]) & (pos[None, :] < lay.starts[row][:, None])
    allowed = own | shared
    masks = {}
    for kind in set(hooked.layer_types):
        window = hooked.sliding_window if kind == "sliding_attention" else None
        ok = allowed & (pos[:, None] - pos[None, :] < window) if window is not None else allowed
        mask = torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)
        masks[kind] = mask[None, None].to(device)
    return masks


def _repack(item: Intervention, lay: Layout, seq_len: int) -> Intervention | None:
    """``item`` re-addressed into the sequence: the selection it makes on the unpacked batch (rows x
    positions, or paired), computed on that selection's shape and written where the sequence holds
    it (padding positions are not in the sequence). None when it selects nothing held."""
    if item.site.kind not in PACKED_KINDS:
        raise ValueError(f"a packed pass cannot re-address an intervention on {item.site} (token-wise sites only)")
    rows = as_long(item.rows)
    if rows is None:
        rows = torch.arange(len(lay.lengths))
    positions = as_long(item.positions)
    if item.paired and positions is not None:
        grid_rows, grid_pos = rows, positions
    else:
        positions = torch.arange(seq_len) if positions is None else positions
        grid_rows, grid_pos = rows[:, None].expand(-1, len(positions)), positions[None, :].expand(len(rows), -1)
    if rows.numel() and (rows.min() < 0 or rows.max() >= len(lay.lengths)):
        raise InterventionError(f"intervention on {item.site}: rows {rows.tolist()} out of range for {len(lay.lengths)} rows")
    late = lay.joins[rows] > int(item.site.layer)  # type: ignore[arg-type]  # PACKED_KINDS are per layer
    if late.any():
        row = int(rows[late][0])
        raise InterventionError(f"row {row} joins at layer {int(lay.joins[row])}, so it cannot be changed at {item.site}")
    grid_pos = torch.where(grid_pos < 0, lay.lengths[grid_rows] + grid_pos, grid_pos)
    if grid_pos.numel() and (grid_pos.min() < 0 or grid_pos.max() >= seq_len):
        raise InterventionError(f"intervention on {item.site}: position out of range (sequence length {seq_len})")
    where = lay.index(grid_rows.reshape(-1), grid_pos.reshape(-1))
    held = where >= 0
    if not held.any():
        return None
    shape = tuple(grid_rows.shape)

    def values(selected: torch.Tensor) -> torch.Tensor:
        whole = selected
        if not held.all():  # the unpacked selection, padding entries zero (their values are dropped)
            whole = selected.new_zeros((len(held), *selected.shape[1:]))
            whole[held.to(selected.device)] = selected
        new = item.new_values(whole.view(*shape, *selected.shape[1:])).reshape(whole.shape)
        return new if whole is selected else new[held.to(selected.device)]

    index = where[held]
    return Intervention(item.site, "apply", fn=values, rows=torch.zeros_like(index), positions=index, paired=True)


@torch.no_grad()
def run_packed(
    hooked: HookedModel, batch: TokenBatch, forks: Sequence[PackedFork], interventions: Sequence[Intervention] = ()
) -> torch.Tensor:
    """Last-position logits ``[b + len(forks), vocab]`` of the batch's rows, then the forks', from one
    packed pass (see the module docstring). Interventions act at :data:`PACKED_KINDS` sites, their
    ``rows`` indexing the batch's rows then the forks."""
    n_layers, device = hooked.n_layers, hooked.device
    lay = layout(batch, forks, n_layers)
    for item in interventions:
        hooked.validate_site(item.site)
    items = [packed for item in interventions if (packed := _repack(item, lay, batch.seq_len)) is not None]
    plan = HookPlan(interventions=items, lengths=torch.tensor([lay.size]), seq_len=lay.size)
    row, pos = lay.tokens()
    own = int(lay.lengths[: batch.size].sum())  # the batch's own tokens come first
    ids = batch.input_ids.cpu()[row[:own], pos[:own]][None].to(device)
    position_ids = pos[None].to(device)
    masks = _masks(hooked, lay, hooked.dtype, device)
    with hooked.activated(plan, range(n_layers)):
        hidden = runner.embed(hooked, ids, plan, position_ids[:, :own])
        rotary = None
        if hooked.spec.rotary is not None:
            rotary = hooked.base.get_submodule(hooked.spec.rotary)(hidden, position_ids=position_ids)
        bounds = sorted({0, n_layers, *(f.layer for f in forks)})
        for start, stop in zip(bounds, bounds[1:]):
            joining = [_copied(lay, f) for f in forks if f.layer == start]
            if joining:
                hidden = torch.cat([hidden, hidden[:, torch.cat(joining).to(device)]], dim=1)
            n = lay.present[start]
            ctx = runner.LayerContext(
                position_ids[:, :n],
                (rotary[0][:, :n], rotary[1][:, :n]) if rotary is not None else None,
                {kind: mask[..., :n, :n] for kind, mask in masks.items()},
                hooked.layer_types,
            )
            hidden = runner.run_layers(hooked, hidden, ctx, plan, start, stop)
        last = (lay.offsets + lay.lengths - lay.starts - 1).to(device)
        return runner.unembed(hooked, hidden[:, last].transpose(0, 1), plan, torch.zeros(len(last), dtype=torch.long))


def _copied(lay: Layout, fork: PackedFork) -> torch.Tensor:
    """The sequence indices a fork copies when it joins: its base row's positions ``start..``."""
    offset = int(lay.offsets[fork.base])
    return torch.arange(offset + fork.start, offset + int(lay.lengths[fork.base]))
