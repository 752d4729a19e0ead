"""Pipeline passes that start mid-model: the per-stage tasks of a :class:`~interplab.engine.results.StageRequest`.

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

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from interplab.engine.interventions import Intervention
from interplab.engine.plan import KVPrefix
from interplab.engine.results import LogitsMode, StageRequest
from interplab.engine.sites import Site
from interplab.engine.stage_checks import check_joins, check_vocab
from interplab.engine.tokens import TokenBatch
from interplab.runtime.microbatch import narrow_interventions, slice_batch
from interplab.runtime.task import StageEntry, StageSpan, StageTask

if TYPE_CHECKING:
    from interplab.engine.hooked import HookedModel
    from interplab.runtime.scheduler import MakeTasks, Scheduler

Key = TypeVar("Key")


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
    logits: LogitsMode,
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
        stage_prefix = prefix.narrow(lo, hi, range(s_start, s_stop)) if prefix is not None else None
        span = StageSpan(
            start=s_start, stop=s_stop, with_head=with_head and last, logits=logits, vocab=vocab if with_head and last else None
        )
        entry = StageEntry(
            hidden=part if s_start == first else None,
            joins={layer: rows for layer, rows in part_joins.items() if s_start <= layer < s_stop} or None,
            prefix=stage_prefix,
        )
        tasks.append(
            StageTask(
                call=call,
                mb=mb,
                prompt_ids=list(range(lo, lo + present)),
                batch=slice_batch(batch, lo, lo + present),
                interventions=[x for x in items if stage_of(x.site) == index],
                span=span,
                entry=entry,
            )
        )
    return tasks


class PartialCall:
    """One mid-model pass on a pipeline: the checked request, its micro-batches' task makers, and
    the outputs collected as the micro-batches finish."""

    def __init__(self, scheduler: Scheduler, skeleton: HookedModel, request: StageRequest) -> None:
        r = request
        n_layers = skeleton.n_layers
        if not 0 <= r.start < r.stop <= n_layers:
            raise ValueError(f"run_stage: layers [{r.start}, {r.stop}) are not a block of the model's {n_layers} layers")
        if r.with_head and r.stop != n_layers:
            raise ValueError(f"run_stage: with_head needs stop={n_layers} (the last layer), got {r.stop}")
        self.vocab = check_vocab(r.vocab, r.with_head, skeleton.d_vocab) if r.vocab is not None else None
        if any(not isinstance(j, torch.Tensor) for j in (r.joins or {}).values()):
            raise ValueError("run_stage: a pipeline takes joins as resid_pre tensors; forks of rows run on one process only")
        self.joins = {layer: j for layer, j in (r.joins or {}).items() if isinstance(j, torch.Tensor)}
        if self.joins and r.hidden is None and r.start not in self.joins:
            raise ValueError(f"run_stage: no rows at layer {r.start}: pass hidden or joins[{r.start}]")
        if self.joins:
            check_joins(r.batch, r.start, r.stop, r.hidden, self.joins, False)
        elif r.hidden is None and r.start > 0:
            raise ValueError(f"run_stage: starting at layer {r.start} needs hidden (the resid_pre there) or joins")
        for item in r.interventions:
            skeleton.validate_site(item.site)
        self.scheduler, self.request = scheduler, r
        self.interventions = list(r.interventions)
        has_rows = self.joins or r.hidden is not None
        self.entries = entry_layers(r.start, r.hidden, self.joins) if has_rows else torch.zeros(r.batch.size, dtype=torch.long)
        self.parts = scheduler.micro_parts(r.batch, self.interventions)
        self.outputs: dict[int, torch.Tensor] = {}

    def items(self) -> Iterator[tuple[int, MakeTasks]]:
        """``(micro-batch, make_tasks(call))`` for :meth:`Scheduler.drive`."""
        r = self.request

        def maker(mb: int, lo: int, hi: int) -> MakeTasks:
            return lambda call: partial_tasks(
                self.scheduler.stage_ranges,
                self.scheduler.stage_of,
                call,
                mb,
                r.batch,
                lo,
                hi,
                start=r.start,
                stop=r.stop,
                hidden=r.hidden,
                joins=self.joins,
                entries=self.entries,
                interventions=self.interventions,
                prefix=r.prefix,
                with_head=r.with_head,
                logits=r.logits,
                vocab=self.vocab,
            )

        for mb, (lo, hi) in enumerate(self.parts):
            yield mb, maker(mb, lo, hi)

    def add(self, mb: int, output: torch.Tensor) -> bool:
        """Record micro-batch ``mb``'s output; True once every micro-batch has finished."""
        self.outputs[mb] = output
        return len(self.outputs) == len(self.parts)

    def output(self) -> torch.Tensor:
        return torch.cat([self.outputs[mb] for mb in range(len(self.parts))])


def run_partial_calls(
    scheduler: Scheduler,
    skeleton: HookedModel,
    requests: Iterable[tuple[Key, StageRequest]],
    on_done: Callable[[Key, torch.Tensor], None],
) -> None:
    """Stream ``requests`` (consumed lazily) through the pipeline together; ``on_done(key, output)``
    as each call's last micro-batch finishes."""
    pending: dict[Any, PartialCall] = {}

    def items() -> Iterator[tuple[tuple[Any, int], MakeTasks]]:
        for key, request in requests:
            call = PartialCall(scheduler, skeleton, request)
            pending[key] = call
            for mb, make in call.items():
                yield (key, mb), make

    def done(item: tuple[Any, int], sides: list[Any], output: Any) -> None:
        key, mb = item
        if pending[key].add(mb, output):
            on_done(key, pending.pop(key).output())

    scheduler.drive(items(), done)
