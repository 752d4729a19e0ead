"""A hook plan: what one forward pass captures, changes and differentiates, site by site.

The runner and the module hooks call :meth:`HookPlan.process` at every site the plan touches; the
plan applies that site's interventions in order, then records the (post-intervention) value for
capture and, when gradients are requested, keeps the tensor that flows on so ``autograd.grad`` can
reach it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from interplab.engine.arena import Lease
from interplab.engine.interventions import Intervention
from interplab.engine.sites import Site, SiteKind

Positions = Sequence[int] | torch.Tensor | None


@dataclass(frozen=True, eq=False)
class Fork:
    """Rows that join a ``run_stage`` batch as copies of rows already in it: ``rows`` (``Long[r]``)
    index the batch as it stands just before the join's layer, and the new rows start from those
    rows' ``resid_pre`` there. A row that differs from another only from layer L on (a patch at
    layer L of the same prompt) then shares every layer before L with it, in the same pass."""

    rows: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.rows.numel())


@dataclass(frozen=True)
class KVPrefix:
    """Keys and values of the first ``length`` positions, per layer ``(k, v)`` ``[b, h_kv, length, d]``
    (after rotary embedding), reused so a pass computes only positions ``length..s-1``.

    Valid whenever nothing before position ``length`` differs from the run the prefix came from:
    causal attention means a change at position p never reaches earlier positions.

    ``rows`` (``Long[b]``), when given, says which of ``kv``'s rows each batch row reuses: many
    patched rows of one prompt then share one copy of its prefix (in memory and on the wire), and
    each layer gathers the rows it needs as it runs. Without it, batch row r reuses ``kv`` row r.
    """

    length: int
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    rows: torch.Tensor | None = None

    def layer_kv(self, layer: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[size, h_kv, length, d]`` of the batch's first ``size`` rows at ``layer``
        (fewer than the batch while rows are still to join it: ``run_stage``'s joins)."""
        k, v = self.kv[layer]
        if self.rows is None:
            return k[:size], v[:size]
        index = self.rows[:size].to(k.device)
        return k[index], v[index]

    def narrow(self, lo: int, hi: int, layers: range) -> KVPrefix:
        """The prefix of batch rows ``[lo, hi)`` at ``layers`` (a pipeline stage's microbatch)."""
        kv = {layer: pair for layer, pair in self.kv.items() if layer in layers}
        if self.rows is not None:
            return KVPrefix(self.length, kv, self.rows[lo:hi])
        return KVPrefix(self.length, {layer: (k[lo:hi], v[lo:hi]) for layer, (k, v) in kv.items()})


def resolve_positions(positions: Positions, lengths: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row positions ``Long[b, p]`` and their validity ``Bool[b, p]``.

    ``None``: every position (padding marked invalid). A list of ints: the same positions for every
    row, negatives counting from each row's end. A ``Long[b, p]`` tensor: explicit per-row positions.
    """
    b = len(lengths)
    if positions is None:
        pos = torch.arange(seq_len).expand(b, seq_len).clone()
        return pos, pos < lengths[:, None]
    if isinstance(positions, torch.Tensor) and positions.ndim == 2:
        pos = positions.to(torch.long).cpu()
    else:
        wanted = torch.as_tensor(list(positions) if not isinstance(positions, torch.Tensor) else positions, dtype=torch.long)
        pos = wanted.expand(b, -1)
        pos = torch.where(pos < 0, lengths[:, None] + pos, pos)
    valid = (pos >= 0) & (pos < lengths[:, None])
    if not valid.all():
        bad = positions if not isinstance(positions, torch.Tensor) else positions.tolist()
        raise ValueError(
            f"positions {bad} are out of range for prompts of lengths {lengths.tolist()}; "
            "use positions within every prompt (negative numbers count from each prompt's end)"
        )
    return pos, valid


class HookPlan:
    """Captures, interventions and gradient sites for one forward pass."""

    def __init__(
        self,
        *,
        capture: Sequence[Site] = (),
        interventions: Sequence[Intervention] = (),
        grad_sites: Sequence[Site] = (),
        lengths: torch.Tensor,
        seq_len: int,
        positions: Positions = None,
        keep_grad: bool = False,
        prefix: KVPrefix | None = None,
        record_kv: bool = False,
    ) -> None:
        self.prefix = prefix
        self.record_kv = record_kv
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lengths = lengths.cpu()
        self.seq_len = seq_len
        self.positions, self.valid = resolve_positions(positions, self.lengths, seq_len)
        self._all_positions = positions is None
        self.capture_sites: dict[Site, list[Site]] = defaultdict(list)
        for site in capture:
            self.capture_sites[site.all_heads()].append(site)
        self.interventions: dict[Site, list[Intervention]] = defaultdict(list)
        for item in interventions:
            self.interventions[item.site.all_heads()].append(item)
        self.grad_sites = {site.all_heads() for site in grad_sites}
        self.keep_grad = keep_grad or bool(self.grad_sites)
        self.captured: dict[Site, torch.Tensor] = {}
        self.grad_tensors: dict[Site, torch.Tensor] = {}
        # (tensor, its version, heads first?, what gather returned)
        self._last_gathered: tuple[torch.Tensor, int, bool, torch.Tensor] | None = None
        self.lease: Lease | None = None  # an arena lease for whole-activation captures (set by the model for plain runs)
        # a site whose gradient is derived from its tensor's gradient after the backward pass
        self.grad_derive: dict[Site, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.resid_pre: dict[int, torch.Tensor] = {}
        self._active: dict[tuple[SiteKind, int | None], bool] = {}
        for key in list(self.capture_sites) + list(self.interventions) + list(self.grad_sites):
            self._active[(key.kind, key.layer)] = True
        self._attention_layers = {layer for (kind, layer) in self._active if kind.in_attention}

    # ------------------------------------------------------------------ queries
    def active(self, kind: SiteKind, layer: int | None = None) -> bool:
        return (kind, layer) in self._active

    def layer_kinds(self, layer: int | None) -> set[SiteKind]:
        return {kind for (kind, at) in self._active if at == layer}

    def hooks_attention(self, layer: int) -> bool:
        """True if the plan touches a kind computed inside ``layer``'s attention kernel
        (:attr:`SiteKind.in_attention`): the kernel must run its explicit path there."""
        return layer in self._attention_layers

    def wants(self, kind: SiteKind, layer: int | None = None) -> bool:
        """True if the site is captured or differentiated (its value must be computed)."""
        key = Site(kind, layer)
        return key in self.capture_sites or key in self.grad_sites

    def intervened(self, kind: SiteKind, layer: int | None = None) -> bool:
        return Site(kind, layer) in self.interventions

    # ------------------------------------------------------------------ processing
    def process(self, kind: SiteKind, layer: int | None, x: torch.Tensor) -> torch.Tensor:
        """Apply interventions at a site, record captures and gradient tensors, return the new value.

        ``x`` is in the kind's captured layout (:attr:`SiteKind.layout`); interventions see it in
        the canonical layout ``[b, s, ...]`` (:meth:`SiteKind.to_canonical`).
        """
        key = Site(kind, layer)
        items = self.interventions.get(key)
        if items:
            view = kind.to_canonical(x)
            for item in items:
                view = item.apply(view, self.lengths)
            x = kind.from_canonical(view)
        if key in self.grad_sites:
            self.grad_tensors[key] = x
        if key in self.capture_sites:
            self.captured[key] = self.gather(x, heads_first=kind.heads_first)
        return x

    def record(self, kind: SiteKind, layer: int | None, x: torch.Tensor) -> None:
        """Record a derived value (e.g. ``head_out``) for capture only."""
        key = Site(kind, layer)
        if key in self.capture_sites:
            self.captured[key] = self.gather(x, heads_first=kind.heads_first)

    def record_sum(self, kind: SiteKind, layer: int | None, a: torch.Tensor, b: torch.Tensor) -> None:
        """Record ``a + b`` for capture only (``resid_mid``), added straight into the arena when it
        has room: no temporary tensor."""
        key = Site(kind, layer)
        if key not in self.capture_sites:
            return
        lease = self.lease
        if lease is not None and self._pooled(a) and a.shape == b.shape and a.dtype == b.dtype:
            out = lease.take(a)
            if out is not None:
                self.captured[key] = torch.add(a.detach(), b.detach(), out=out)
                return
        self.captured[key] = self.gather(a + b)

    def alias_grad(self, kind: SiteKind, layer: int | None, x: torch.Tensor) -> None:
        """Use ``x``'s gradient as the gradient of a site that has no tensor of its own."""
        key = Site(kind, layer)
        if key in self.grad_sites:
            self.grad_tensors[key] = x

    def gather(self, x: torch.Tensor, *, heads_first: bool = False, pattern: bool | None = None) -> torch.Tensor:
        """Select the plan's positions and detach unless keeping grads.

        ``heads_first``: ``x`` is ``[b, h, p, ...]`` (:attr:`SiteKind.heads_first`, i.e. ``pattern``),
        whose positions are the query positions of axis 2. ``pattern`` is the old name of the same
        flag, kept for callers that still pass it.
        """
        if pattern is not None:
            heads_first = pattern
        last = self._last_gathered
        if last is not None and last[0] is x and last[1] == x._version and last[2] == heads_first:
            return last[3]  # the same tensor at two sites (resid_post[l] is resid_pre[l+1]): one copy
        out = self._gather(x, heads_first)
        self._last_gathered = (x, x._version, heads_first, out)
        return out

    def _pooled(self, x: torch.Tensor) -> bool:
        """Whether a whole-activation capture of ``x`` may be copied into the arena lease."""
        return (
            self.lease is not None and self._all_positions and not self.keep_grad and x.is_floating_point() and x.is_contiguous()
        )

    def _gather(self, x: torch.Tensor, heads_first: bool) -> torch.Tensor:
        if not self.keep_grad:
            x = x.detach()
        if self._all_positions:
            lease = self.lease
            if lease is not None and self._pooled(x):
                out = lease.take(x)
                if out is not None:  # a copy into reused memory (see interplab.engine.arena)
                    return out.copy_(x)
            return x
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        if heads_first:
            return x.transpose(1, 2)[rows, self.positions.to(x.device)].transpose(1, 2)
        return x[rows, self.positions.to(x.device)]

    def head_of(self, site: Site, value: torch.Tensor, *, pattern: bool | None = None) -> torch.Tensor:
        """Narrow a per-head value (captured layout) to ``site.head`` when the site selects one head.

        The head axis comes from ``site.kind`` (:attr:`SiteKind.head_axis`); ``pattern`` is ignored,
        kept for callers that still pass it.
        """
        head_axis = site.kind.head_axis  # None unless the kind is per head
        if site.head is None or head_axis is None:
            return value
        return value.narrow(head_axis, site.head, 1)
