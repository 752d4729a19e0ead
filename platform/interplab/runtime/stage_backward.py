"""A stage's backward half: from the gradient of its output to that of its input and its sites.

The last stage's :meth:`StageBackward.finish` evaluates the metric (or loss) on the logits of all
micro-batches of a call and starts the backward pass; every earlier stage's :meth:`backward` turns
the gradient of its output into that of its input (and of its own sites, or of its parameters when
training). For data-parallel training the driver evaluates the loss: :meth:`outputs` hands it the
logits and :meth:`backward_outputs` takes their gradient back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from interplab.runtime.stage_graphs import KeptGraphs

if TYPE_CHECKING:
    import torch

    from interplab.engine.cache import ActivationCache
    from interplab.engine.hooked import HookedModel
    from interplab.engine.sites import Site
    from interplab.engine.tokens import TokenBatch
    from interplab.runtime.task import Mode


def input_grad(hidden: torch.Tensor | None, grad: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient of a micro-batch's input boundary for the previous stage (CPU): ``grad``, zeros
    where no gradient reached the input, None when the stage had no input (the first stage)."""
    if hidden is None:
        return None
    import torch

    return (grad if grad is not None else torch.zeros_like(hidden)).detach().to("cpu")


def _none(n: int) -> list[torch.Tensor | None]:
    """No gradient for ``n`` sites (training computes parameter gradients only)."""
    return [None] * n


class StageBackward:
    """Backward passes through the graphs :class:`~interplab.runtime.stage_forward.StageForward` kept."""

    def __init__(self, hooked: HookedModel, device: str, graphs: KeptGraphs) -> None:
        self.hooked, self.device, self.graphs = hooked, device, graphs

    def _targets(self, call: int, mb: int) -> tuple[list[Site], list[torch.Tensor]]:
        """The gradient sites and the tensors to differentiate: the sites', then the input's."""
        kept = self.graphs.get(call, mb)
        sites = list(kept.task.grad_sites)
        tensors = [kept.stage.plan.grad_tensors[s.all_heads()] for s in sites]
        if kept.hidden is not None:
            tensors.append(kept.hidden)
        return sites, tensors

    def _site_grads(self, call: int, mb: int, sites: Sequence[Site], grads: Sequence[torch.Tensor | None]) -> ActivationCache:
        plan = self.graphs.get(call, mb).stage.plan
        return self.hooked.site_grads(plan, sites, grads[: len(sites)]).to("cpu")

    def finish(self, call: int, mbs: Sequence[int], batch: TokenBatch, fn: Callable[..., torch.Tensor], mode: Mode) -> list[Any]:
        """``[summary, grad_in_0, grad_in_1, ...]``: the summary holds the value, the logits and this
        stage's site gradients per micro-batch; ``grad_in_i`` is the gradient of micro-batch ``i``'s
        input boundary (None on a single-stage pipeline)."""
        import torch

        kept = [self.graphs.get(call, mb) for mb in mbs]
        with torch.enable_grad():
            logits = torch.cat([k.stage.output for k in kept], dim=0)
            value = fn(logits, batch.to(logits.device))
            if value.numel() != 1:
                raise ValueError(f"the metric must return a scalar, got shape {tuple(value.shape)}")
            targets = [self._targets(call, mb) for mb in mbs]
            grads: list[list[torch.Tensor | None]]
            if mode == "train":
                value.backward()
                grads = [_none(len(s)) + ([k.hidden.grad] if k.hidden is not None else []) for k, (s, _) in zip(kept, targets)]
            else:
                flat = [t for _, ts in targets for t in ts]
                flat_grads: list[torch.Tensor | None] = list(torch.autograd.grad(value, flat, allow_unused=True)) if flat else []
                grads, i = [], 0
                for _, ts in targets:
                    grads.append(flat_grads[i : i + len(ts)])
                    i += len(ts)
        site_grads, grad_ins = [], []
        for mb, k, (sites, _), g in zip(mbs, kept, targets, grads):
            site_grads.append(self._site_grads(call, mb, sites, g) if mode == "grad" else None)
            grad_ins.append(input_grad(k.hidden, g[-1] if k.hidden is not None else None))
        self.graphs.release(call, mbs)
        summary = {"value": value.detach().cpu(), "logits": logits.detach().cpu(), "site_grads": site_grads}
        return [summary, *grad_ins]

    def outputs(self, call: int, mbs: Sequence[int]) -> torch.Tensor:
        """The logits of micro-batches ``mbs`` of ``call`` (CPU), for the driver to evaluate a
        data-parallel loss on every replica's rows at once."""
        import torch

        return torch.cat([self.graphs.get(call, mb).stage.output.detach() for mb in mbs]).to("cpu")

    def backward_outputs(self, call: int, mbs: Sequence[int], grad: torch.Tensor) -> list[Any]:
        """Backward from ``grad``, the loss gradient of this stage's logits for ``mbs`` (rows in
        order). Returns ``[rows, grad_in_0, grad_in_1, ...]`` as :meth:`finish` does."""
        import torch

        kept = [self.graphs.get(call, mb) for mb in mbs]
        outs = [k.stage.output for k in kept]
        parts = torch.split(grad.to(self.device, outs[0].dtype), [o.shape[0] for o in outs])
        live = [(o, g) for o, g in zip(outs, parts) if o.requires_grad]
        if live:
            torch.autograd.backward([o for o, _ in live], [g for _, g in live])
        grad_ins = [input_grad(k.hidden, k.hidden.grad if k.hidden is not None else None) for k in kept]
        self.graphs.release(call, mbs)
        return [int(grad.shape[0]), *grad_ins]

    def backward(self, call: int, mb: int, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ActivationCache | None]:
        """Gradient of this stage's output → ``(grad of its input, its site gradients)``."""
        import torch

        kept = self.graphs.get(call, mb)
        grad_out = grad_out.to(self.device)
        sites, tensors = self._targets(call, mb)
        grads: list[torch.Tensor | None]
        if kept.task.mode == "train":
            if kept.stage.output.requires_grad:  # False: nothing on or below this stage trains
                torch.autograd.backward(kept.stage.output, grad_out)
            grads = _none(len(sites)) + ([kept.hidden.grad] if kept.hidden is not None else [])
        else:
            grads = list(torch.autograd.grad(kept.stage.output, tensors, grad_out, allow_unused=True)) if tensors else []
        site_grads = self._site_grads(call, mb, sites, grads) if kept.task.mode == "grad" else None
        grad_in = input_grad(kept.hidden, grads[-1] if kept.hidden is not None else None)
        self.graphs.release(call, [mb])
        return grad_in, site_grads
