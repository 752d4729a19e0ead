"""Splitting one batch into GPipe micro-batches: row ranges, with each intervention narrowed to its rows.

A batch is tokenised once (so every micro-batch has the full batch's padded length and positions mean
the same thing) and split into contiguous row ranges. An intervention that addresses rows (``rows=``,
paired patches, per-row values) is rewritten for each range: only its rows in the range, renumbered
from 0, with the matching per-row positions, heads and values. An ``apply`` intervention (an opaque
function of the whole selection) cannot be split, so a call carrying one runs as one micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from interplab.engine.interventions import Intervention, as_long
from interplab.engine.plan import Positions
from interplab.engine.tokens import TokenBatch


def row_ranges(n_rows: int, n_parts: int) -> list[tuple[int, int]]:
    """Up to ``n_parts`` contiguous, near-equal, non-empty row ranges covering ``[0, n_rows)``."""
    n_parts = max(1, min(n_parts, n_rows))
    base, extra = divmod(n_rows, n_parts)
    out, start = [], 0
    for i in range(n_parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def lent_threads(threads: Sequence[int], mb: int, n_mbs: int) -> list[int]:
    """Torch threads per stage for micro-batch ``mb`` of ``n_mbs`` in one GPipe call whose stages
    share one node's cores (``threads[s]``: stage s's own share).

    While micro-batch 0 is at stage s, the stages after s are idle (waiting for it); while the last
    micro-batch is at stage s, the stages before s are done. So micro-batch 0 may use its stage's
    threads plus every later stage's, and the last micro-batch its stage's plus every earlier one's,
    and the node is never oversubscribed: every other stage busy at that moment runs on its own share.
    """
    out = []
    for s in range(len(threads)):
        n = threads[s]
        if mb == 0:
            n += sum(threads[s + 1 :])
        if mb == n_mbs - 1:
            n += sum(threads[:s])
        out.append(n)
    return out


def splittable(interventions: Sequence[Intervention]) -> bool:
    """True if every intervention can be narrowed to a row range."""
    return all(item.op != "apply" for item in interventions)


def slice_batch(batch: TokenBatch, lo: int, hi: int) -> TokenBatch:
    texts = batch.texts[lo:hi] if batch.texts is not None else None
    return TokenBatch(batch.input_ids[lo:hi], batch.attention_mask[lo:hi], batch.lengths[lo:hi], texts)


def slice_positions(positions: Positions, lo: int, hi: int) -> Positions:
    if isinstance(positions, torch.Tensor) and positions.ndim == 2:
        return positions[lo:hi]
    return positions


def _selection_ndim(item: Intervention) -> int:
    """Number of dimensions of the selection ``x[item.index(x)]`` (rows first)."""
    full = len(item.site.kind.layout)  # pattern is [b, q, h, k] in the canonical layout: 4 axes too
    lead = 1 if item.paired and item.positions is not None else 2
    heads = 1 if (item.heads is not None or item.site.head is not None) else 0
    return lead + (full - 2) - heads


def _per_row_value(item: Intervention, n_rows: int) -> bool:
    value = item.value
    return (
        isinstance(value, torch.Tensor)
        and value.ndim == _selection_ndim(item)
        and value.ndim > 0
        and value.shape[0] == n_rows
        and n_rows > 1
    )


def narrow_intervention(item: Intervention, lo: int, hi: int, batch_size: int) -> Intervention | None:
    """``item`` restricted to batch rows ``[lo, hi)`` and renumbered from 0; None if it touches none."""
    if item.op == "apply":
        raise ValueError("an 'apply' intervention cannot be split across micro-batches")
    rows = as_long(item.rows)
    if rows is None:
        if not _per_row_value(item, batch_size):
            return item
        return replace(item, value=_rows_of(item.value)[lo:hi])
    keep = (rows >= lo) & (rows < hi)
    if not bool(keep.any()):
        return None
    if bool(keep.all()) and lo == 0:
        return item
    changes: dict = {"rows": rows[keep] - lo}
    if item.paired:
        for name in ("positions", "heads"):
            values = as_long(getattr(item, name))
            if values is not None:
                changes[name] = values[keep]
    if _per_row_value(item, len(rows)):
        changes["value"] = _rows_of(item.value)[keep]
    return replace(item, **changes)


def _rows_of(value: object) -> torch.Tensor:
    """A per-row intervention value (only tensors have rows: see :func:`_per_row_value`)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"a per-row intervention value must be a tensor, got {type(value).__name__}")
    return value


def narrow_interventions(items: Sequence[Intervention], lo: int, hi: int, batch_size: int) -> list[Intervention]:
    out = []
    for item in items:
        narrowed = narrow_intervention(item, lo, hi, batch_size)
        if narrowed is not None:
            out.append(narrowed)
    return out
