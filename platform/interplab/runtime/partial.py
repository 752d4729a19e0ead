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

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

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


class PartialCall:
    """One ``run_stage`` call on a pipeline: checked arguments, its micro-batches' task makers, and
    the outputs collected as the micro-batches finish."""

    def __init__(
        self,
        pipe,
        batch: TokenBatch,
        *,
        start: int,
        stop: int,
        hidden: torch.Tensor | None = None,
        with_head: bool = False,
        interventions: Sequence[Intervention] = (),
        logits: str = "all",
        prefix: KVPrefix | None = None,
        joins: Mapping[int, torch.Tensor] | None = None,
        vocab: torch.Tensor | None = None,
    ) -> None:
        from interplab.engine.hooked import HookedModel

        if not 0 <= start < stop <= pipe.n_layers:
            raise ValueError(f"run_stage: layers [{start}, {stop}) are not a block of the model's {pipe.n_layers} layers")
        if with_head and stop != pipe.n_layers:
            raise ValueError(f"run_stage: with_head needs stop={pipe.n_layers} (the last layer), got {stop}")
        if vocab is not None:
            vocab = pipe._skeleton.check_vocab(vocab, with_head)
        joins = dict(joins or {})
        if joins:
            HookedModel.check_joins(batch, start, stop, hidden, joins, False)
        elif hidden is None and start > 0:
            raise ValueError(f"run_stage: starting at layer {start} needs hidden (the resid_pre there) or joins")
        pipe._validate((), interventions)
        self.pipe, self.batch = pipe, batch
        self.start, self.stop, self.hidden, self.joins = start, stop, hidden, joins
        self.interventions, self.prefix, self.with_head, self.logits, self.vocab = list(interventions), prefix, with_head, logits, vocab
        self.entries = entry_layers(start, hidden, joins) if joins or hidden is not None else torch.zeros(batch.size, dtype=torch.long)
        self.parts = pipe._micro_parts(batch, interventions)
        self.outputs: dict[int, torch.Tensor] = {}

    def items(self) -> Iterator[tuple[int, Callable[[int], list[StageTask | None]]]]:
        """``(micro-batch, make_tasks(call))`` for ``PipelineModel._drive``."""
        for mb, (lo, hi) in enumerate(self.parts):
            yield mb, lambda call, mb=mb, lo=lo, hi=hi: partial_tasks(
                self.pipe.stage_ranges, self.pipe.stage_of, call, mb, self.batch, lo, hi, start=self.start,
                stop=self.stop, hidden=self.hidden, joins=self.joins, entries=self.entries,
                interventions=self.interventions, prefix=self.prefix, with_head=self.with_head,
                logits=self.logits, vocab=self.vocab,
            )

    def add(self, mb: int, output: torch.Tensor) -> bool:
        """Record micro-batch ``mb``'s output; True once every micro-batch has finished."""
        self.outputs[mb] = output
        return len(self.outputs) == len(self.parts)

    def output(self) -> torch.Tensor:
        return torch.cat([self.outputs[mb] for mb in range(len(self.parts))])


def run_partial_calls(pipe, requests, on_done: Callable[[Any, torch.Tensor], None]) -> None:
    """Stream ``requests`` (``(key, run_stage keyword arguments)``, consumed lazily) through ``pipe``
    together; ``on_done(key, output)`` as each call's last micro-batch finishes."""
    pending: dict[Any, PartialCall] = {}

    def items():
        for key, kwargs in requests:
            call = PartialCall(pipe, **kwargs)
            pending[key] = call
            for mb, make in call.items():
                yield (key, mb), make

    def done(item, sides, output) -> None:
        key, mb = item
        if pending[key].add(mb, output):
            on_done(key, pending.pop(key).output())

    pipe._drive(items(), done)
