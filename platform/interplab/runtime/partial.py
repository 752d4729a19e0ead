"""Pipeline passes that start mid-model: :meth:`PipelineModel.run_stage`'s per-stage tasks.

``HookedModel.run_stage`` lets a pass start at a later layer from given hidden states, let rows join
the batch at their own layer (``joins``: each row's ``resid_pre`` there) and reuse cached keys/values
of the first positions (``prefix``). Patching sweeps use all three: a row patched at layer L only
differs from the target run from L on, and only at and after the patched position.

On a pipeline the same call becomes, for each micro-batch of rows, a chain that starts at the stage
holding the micro-batch's first entry layer (earlier stages do nothing for it). Each stage gets the
rows present by its last layer (rows are ordered by entry layer, so that is a prefix of the
micro-batch), the joins and prefix keys/values of its own layers, the interventions on its sites,
and on the last stage the head's options.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from interplab.engine.interventions import Intervention
from interplab.engine.plan import KVPrefix
from interplab.engine.sites import Site
from interplab.engine.tokens import TokenBatch
from interplab.runtime.microbatch import narrow_interventions, slice_batch
from interplab.runtime.stage import StageTask


def entry_layers(start: int, hidden: torch.Tensor | None, joins: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``Long[rows]``: the layer each row of a ``run_stage`` call starts at (``hidden``'s rows at
    ``start``, then each join's rows at its layer, in layer order: the batch's row order)."""
    counts = [(start, 0 if hidden is None else int(hidden.shape[0]))]
    counts += [(layer, int(joins[layer].shape[0])) for layer in sorted(joins)]
    return torch.tensor([layer for layer, n in counts for _ in range(n)], dtype=torch.long)


def _rows(start: int, hidden: torch.Tensor | None, joins: Mapping[int, torch.Tensor], lo: int, hi: int):
    """Rows ``[lo, hi)`` of the call: ``(their part of hidden or None, their joins by layer)``."""
    n_hidden = 0 if hidden is None else int(hidden.shape[0])
    part = hidden[lo : min(hi, n_hidden)] if hidden is not None and lo < n_hidden else None
    out: dict[int, torch.Tensor] = {}
    offset = n_hidden
    for layer in sorted(joins):
        rows = joins[layer]
        a, b = max(offset, lo), min(offset + rows.shape[0], hi)
        if a < b:
            out[layer] = rows[a - offset : b - offset]
        offset += rows.shape[0]
    return part, out


def partial_tasks(
    stage_ranges: Sequence[tuple[int, int]],
    stage_of: Callable[[Site], int],
    call: int,
    mb: int,
    batch: TokenBatch,
    lo: int,
    hi: int,
    *,
    start: int,
    stop: int,
    hidden: torch.Tensor | None,
    joins: Mapping[int, torch.Tensor],
    entries: torch.Tensor,
    interventions: Sequence[Intervention],
    prefix: KVPrefix | None,
    with_head: bool,
    logits: str,
    vocab: torch.Tensor | None,
) -> list[StageTask | None]:
    """Per-stage tasks for rows ``[lo, hi)`` of a ``run_stage`` call: None for stages before the rows'
    first entry layer, and nothing after the stage holding ``stop - 1``."""
    part, part_joins = _rows(start, hidden, joins, lo, hi)
    mb_entries = entries[lo:hi]
    first = int(mb_entries[0])
    items = narrow_interventions(interventions, lo, hi, batch.size)
    tasks: list[StageTask | None] = []
    for index, (a, b) in enumerate(stage_ranges):
        if a >= stop:
            break
        if b <= first:
            tasks.append(None)
            continue
        s_start, s_stop = max(a, first), min(b, stop)
        present = int((mb_entries < s_stop).sum())  # rows present by the stage's last layer
        last = s_stop == stop
        stage_prefix = None
        if prefix is not None:
            stage_prefix = KVPrefix(prefix.length, {
                layer: (k[lo:hi], v[lo:hi]) for layer, (k, v) in prefix.kv.items() if s_start <= layer < s_stop
            })
        tasks.append(StageTask(
            call=call, mb=mb, prompt_ids=list(range(lo, lo + present)), batch=slice_batch(batch, lo, lo + present),
            interventions=[x for x in items if stage_of(x.site) == index], logits=logits,
            start=s_start, stop=s_stop, with_head=with_head and last,
            joins={layer: rows for layer, rows in part_joins.items() if s_start <= layer < s_stop} or None,
            prefix=stage_prefix, vocab=vocab if with_head and last else None,
            hidden=part if s_start == first else None,
        ))
    return tasks
