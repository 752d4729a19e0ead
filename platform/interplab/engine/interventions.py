"""Interventions: set, add, zero, scale or transform an activation at chosen rows/positions/heads.

Every intervention names a site and an index into the batch. Indexes are either a *cross product*
(the same positions for every selected row) or *paired* (``rows[i]`` gets ``positions[i]`` and/or
``heads[i]``), which is what lets one forward pass carry a different patch on every row.

Activations are addressed in a canonical layout ``[batch, position, ...]``: stream sites
``[b, s, d]``, per-head sites ``[b, s, h, d]``, and ``pattern`` as ``[b, q, h, k]`` (the engine
transposes it from ``[b, h, q, k]`` and back). Updates are out of place (``index_put``), so they are
safe for autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypedDict

import torch

from interplab.engine.sites import Site

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11; annotations only

Op = Literal["set", "add", "scale", "apply"]
Index = int | Sequence[int] | torch.Tensor | None


class InterventionError(ValueError):
    """An intervention that does not fit the activation it targets."""


class IndexArgs(TypedDict, total=False):
    """Where an intervention applies: the keyword arguments of :func:`set_to`, :func:`zero`,
    :func:`steer` and :func:`mean_ablate` (see :class:`Intervention`)."""

    rows: Index
    positions: Index
    heads: Index
    paired: bool


def as_long(value: Index) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, int):
        return torch.tensor([value], dtype=torch.long)
    return torch.as_tensor(value, dtype=torch.long).reshape(-1)


@dataclass(frozen=True, eq=False)
class Intervention:
    """Change the activation at ``site`` for some rows, positions and heads.

    Args:
        site: the site; a per-head site with ``head`` set targets that head only.
        op: ``set`` (to ``value``), ``add`` (``value``; steering), ``scale`` (by ``value``),
            ``apply`` (``fn(selected) -> new``).
        value: a tensor broadcastable to the selection (see :meth:`selection_shape`), or a float.
        rows: batch rows (default all).
        positions: token positions; negative values count from each row's end (``-1``: last real
            token). Default all.
        heads: heads for per-head sites, instead of ``site.head``.
        paired: ``rows``, ``positions`` and ``heads`` are element-wise pairs (one patch per row).
    """

    site: Site
    op: Op
    value: torch.Tensor | float | None = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    rows: Index = None
    positions: Index = None
    heads: Index = None
    paired: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", Site.parse(self.site))
        if self.op not in ("set", "add", "scale", "apply"):
            raise InterventionError(f"unknown intervention op {self.op!r}; use set, add, scale or apply")
        if self.op == "apply" and self.fn is None:
            raise InterventionError("op 'apply' needs fn")
        if self.op != "apply" and self.value is None:
            raise InterventionError(f"op {self.op!r} on {self.site} needs a value")
        if self.heads is not None and not self.site.kind.per_head:
            raise InterventionError(f"heads given for {self.site}, which is not a per-head site")
        if self.heads is not None and self.site.head is not None:
            raise InterventionError(f"{self.site} already selects head {self.site.head}; do not also pass heads")
        if self.paired:
            rows = as_long(self.rows)
            n = len(rows) if rows is not None else None
            for name in ("positions", "heads"):
                other = as_long(getattr(self, name))
                if other is not None and n is not None and len(other) != n:
                    raise InterventionError(
                        f"paired intervention on {self.site}: {name} has {len(other)} entries but rows has {n}"
                    )
            if self.rows is None:
                raise InterventionError(f"paired intervention on {self.site} needs explicit rows")

    # ----------------------------------------------------------------- indexing
    def index(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Advanced-index tuple into ``x`` (canonical layout) selecting what this changes."""
        b, s = x.shape[0], x.shape[1]
        device = x.device
        rows = as_long(self.rows)
        rows = torch.arange(b) if rows is None else rows
        if rows.numel() and (rows.min() < 0 or rows.max() >= b):
            raise InterventionError(f"intervention on {self.site}: rows {rows.tolist()} out of range for batch of {b}")
        positions = as_long(self.positions)
        lengths = lengths.to("cpu")
        if self.paired and positions is not None:
            pos = torch.where(positions < 0, lengths[rows] + positions, positions)
            row_index = rows
        else:
            if positions is None:
                pos = torch.arange(s).expand(len(rows), s)
            else:
                pos = positions.expand(len(rows), -1)
                pos = torch.where(pos < 0, lengths[rows, None] + pos, pos)
            row_index = rows[:, None]
        if pos.numel() and (pos.min() < 0 or pos.max() >= s):
            raise InterventionError(
                f"intervention on {self.site}: position out of range (sequence length {s}); got {self.positions!r}"
            )
        index: tuple[torch.Tensor, ...] = (row_index.to(device), pos.to(device))
        heads = as_long(self.heads) if self.heads is not None else as_long(self.site.head)
        if heads is not None:
            if x.ndim < 4:
                raise InterventionError(f"intervention on {self.site}: activation has no head axis")
            if heads.min() < 0 or heads.max() >= x.shape[2]:
                raise InterventionError(f"intervention on {self.site}: head out of range (model has {x.shape[2]} heads)")
            if self.heads is not None and self.paired:
                head_index = heads if pos.ndim == 1 else heads[:, None]
            elif len(heads) == 1:
                head_index = heads.reshape(())
            else:
                raise InterventionError(f"intervention on {self.site}: several heads need paired=True (one head per row)")
            index = index + (head_index.to(device),)
        return index

    def apply(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Return ``x`` with this intervention applied (``x`` itself is not modified)."""
        fn = self.fn
        if (
            self.op == "apply"
            and fn is not None
            and self.rows is None
            and self.positions is None
            and self.heads is None
            and self.site.head is None
        ):
            new = fn(x)  # the whole activation: no gather/scatter
            if new.shape != x.shape:
                raise InterventionError(
                    f"intervention on {self.site}: fn returned shape {tuple(new.shape)}, expected {tuple(x.shape)}"
                )
            return new
        index = self.index(x, lengths)
        return x.index_put(index, self.new_values(x[index]))

    def new_values(self, selected: torch.Tensor) -> torch.Tensor:
        """What this intervention writes over ``selected`` (the activation at its index, shaped as
        :meth:`index` selects it): a tensor of ``selected``'s shape and dtype."""
        fn, value = self.fn, self.value
        if self.op == "apply":
            if fn is None:  # refused by __post_init__
                raise InterventionError("op 'apply' needs fn")
            new = fn(selected)
        elif value is None:  # refused by __post_init__
            raise InterventionError(f"op {self.op!r} on {self.site} needs a value")
        elif self.op == "scale":
            new = selected * value
        else:
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, dtype=selected.dtype)
            new = value.to(device=selected.device, dtype=selected.dtype)
            if self.op == "add":
                new = selected + new
        try:
            return torch.broadcast_to(new.to(dtype=selected.dtype), selected.shape)
        except RuntimeError:
            raise InterventionError(
                f"intervention on {self.site}: value of shape {tuple(new.shape)} does not fit the selection "
                f"of shape {tuple(selected.shape)}"
            ) from None


# --------------------------------------------------------------------------- constructors
def set_to(site: Site | str, value: torch.Tensor | float, **index: Unpack[IndexArgs]) -> Intervention:
    """Set the selection to ``value`` (a tensor broadcastable to it, or a float)."""
    return Intervention(Site.parse(site), "set", value=value, **index)


def zero(site: Site | str, **index: Unpack[IndexArgs]) -> Intervention:
    """Zero-ablate the selection."""
    return Intervention(Site.parse(site), "set", value=0.0, **index)


def steer(site: Site | str, vector: torch.Tensor, coeff: float = 1.0, **index: Unpack[IndexArgs]) -> Intervention:
    """Add ``coeff * vector`` (e.g. a steering direction) at the selection."""
    return Intervention(Site.parse(site), "add", value=coeff * vector, **index)


def mean_ablate(site: Site | str, mean: torch.Tensor, **index: Unpack[IndexArgs]) -> Intervention:
    """Replace the selection by a mean activation (``[d]``, per-head ``[h, d]`` or per-position ``[s, ...]``).

    Compute ``mean`` over a reference dataset, e.g. ``cache[site].mean(dim=0)``.
    """
    return Intervention(Site.parse(site), "set", value=mean, **index)


def patch(
    site: Site | str,
    source: torch.Tensor,
    *,
    rows: Index = None,
    positions: Index = None,
    heads: Index = None,
    source_rows: Index = None,
    paired: bool = False,
    source_lengths: torch.Tensor | None = None,
) -> Intervention:
    """Copy activations from another run (``source``, a full activation ``[b', s, ...]`` in canonical
    layout) into this run at the same positions/heads.

    ``source_rows[i]`` is the source row for target row ``rows[i]`` (default: the same row).
    Resample ablation is ``patch`` with ``source_rows`` a permutation of another batch.
    """
    site = Site.parse(site)
    src_rows = as_long(source_rows if source_rows is not None else rows)
    lengths = source_lengths if source_lengths is not None else torch.full((source.shape[0],), source.shape[1])
    probe = Intervention(site, "set", value=0.0, rows=src_rows, positions=positions, heads=heads, paired=paired)
    value = source[probe.index(source, lengths)]
    return Intervention(site, "set", value=value, rows=rows, positions=positions, heads=heads, paired=paired)
