"""A stage's forward half: run a micro-batch's task on this stage's layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from interplab.runtime.stage_graphs import KeptGraphs, KeptPass

if TYPE_CHECKING:
    import torch

    from interplab.engine.hooked import HookedModel
    from interplab.runtime.sink import StageWriters
    from interplab.runtime.task import StageSpec, StageTask


def emitted(task: StageTask, output: torch.Tensor) -> torch.Tensor | None:
    """What a stage passes on: its detached output (on its device for a compiled graph's NCCL
    transfer, else on CPU), or None when nothing downstream needs it."""
    if not task.emit:
        return None
    return output.detach() if task.keep_on_device else output.detach().to("cpu")


class StageForward:
    """Runs tasks on one stage's layers; keeps the graphs a backward pass needs; writes captures
    to the store when the task carries a sink."""

    def __init__(self, hooked: HookedModel, spec: StageSpec, graphs: KeptGraphs, writers: StageWriters) -> None:
        self.hooked, self.spec, self.graphs, self.writers = hooked, spec, graphs, writers

    def forward(self, task: StageTask, hidden: torch.Tensor | None) -> tuple[torch.Tensor | None, Any]:
        """``(output for the next stage, side result)``: the side result is the stage's captures (an
        ActivationCache on CPU), ``(captures, {layer: (k, v)})`` with ``keep_kv``, the number of rows
        written with a store sink, or None for a pass with joins."""
        if task.threads is None or task.threads == self.spec.threads:
            return self._forward(task, hidden)
        import torch

        torch.set_num_threads(task.threads)
        try:
            return self._forward(task, hidden)
        finally:
            torch.set_num_threads(max(1, self.spec.threads))

    def _forward(self, task: StageTask, hidden: torch.Tensor | None) -> tuple[torch.Tensor | None, Any]:
        entry, span = task.entry, task.span
        if hidden is None and entry is not None:
            hidden = entry.hidden
        if hidden is not None:
            hidden = hidden.to(self.spec.device)
            if task.mode != "run":
                hidden = hidden.detach().requires_grad_(True)
        start = span.start if span.start is not None else self.spec.start
        stop = span.stop if span.stop is not None else self.spec.stop
        prefix = entry.prefix if entry is not None else None
        if entry is not None and entry.joins:  # rows join at later layers: forward only (run_stage checks the rest)
            output, _ = self.hooked.run_stage(
                task.batch,
                start=start,
                stop=stop,
                hidden=hidden,
                with_head=span.with_head,
                joins=entry.joins,
                interventions=task.interventions,
                logits=span.logits,
                prefix=prefix,
                vocab=span.vocab,
            )
            return emitted(task, output), None
        stage = self.hooked.stage_pass(
            task.batch,
            start=start,
            stop=stop,
            hidden=hidden,
            with_head=span.with_head,
            capture=task.capture,
            interventions=task.interventions,
            grad_sites=task.grad_sites,
            positions=task.positions,
            logits=span.logits,
            grad=task.mode != "run",  # keep the graph on every stage
            prefix=prefix,
            vocab=span.vocab,
            keep_kv=task.keep_kv,
        )
        cache = stage.cache.to("cpu")
        if task.mode != "run":
            self.graphs.keep(task, KeptPass(hidden, stage, task))
            cache = type(cache)({k: v.detach() for k, v in cache.items()}, cache.positions, cache.valid)
        out = emitted(task, stage.output)
        if task.sink is not None:
            return out, self.writers.write(task, cache)
        if task.keep_kv:
            return out, (cache, {layer: (k.to("cpu"), v.to("cpu")) for layer, (k, v) in stage.plan.kv.items()})
        return out, cache
