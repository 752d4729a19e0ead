"""One pipeline stage actor: layers ``[start, stop)`` of a model (embedding on the first, head on the last).

:class:`StageWorker` is what Ray runs as the actor. It is a plain class (unit-testable without Ray)
whose methods are written out (Ray handles do not delegate ``__getattr__``) and hand the work to
one part each:

- :class:`~interplab.runtime.stage_forward.StageForward`: forward passes of micro-batch tasks, and
  the store writes of captures (:class:`~interplab.runtime.sink.StageWriters`);
- :class:`~interplab.runtime.stage_backward.StageBackward`: backward passes through the graphs the
  forward half kept (:class:`~interplab.runtime.stage_graphs.KeptGraphs`);
- :class:`~interplab.runtime.stage_params.StageParameters`: the stage's weights and its Adam;
- :mod:`interplab.runtime.collective`: the gradient all-reduce between replicas.

Every failure inside a method keeps its class and is marked with where it happened (the stage, its
layers and the micro-batch's prompts, the actor's traceback; see :mod:`interplab.runtime.errors`).
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from interplab.engine.training import AdamConfig
from interplab.runtime.errors import StageError, attach
from interplab.runtime.sink import StageWriters
from interplab.runtime.stage_backward import StageBackward
from interplab.runtime.stage_forward import StageForward
from interplab.runtime.stage_graphs import KeptGraphs
from interplab.runtime.stage_params import StageParameters
from interplab.runtime.task import Mode, StageSpec, StageTask

if TYPE_CHECKING:
    import torch

    from interplab.engine.cache import ActivationCache
    from interplab.engine.tokens import TokenBatch

F = TypeVar("F", bound=Callable[..., Any])


def _stage_errors(method: F) -> F:
    """Mark any exception with this stage, its layers and the prompts (see the module docstring)."""

    @functools.wraps(method)
    def wrapper(self: StageWorker, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - this is the error boundary
            task = next((a for a in args if isinstance(a, StageTask)), None)
            call = next((a for a in args if isinstance(a, int)), None)
            ids = list(task.prompt_ids) if task is not None else self.graphs.prompts(call)
            spec = self.spec
            where = StageError(spec.index, (spec.start, spec.stop), ids, type(exc).__name__, str(exc), traceback.format_exc())
            marked = attach(exc, where)
            if marked is exc:
                raise
            raise marked from None

    return wrapper  # type: ignore[return-value]


class StageWorker:
    """Holds one stage's weights and runs its part of every pipeline call."""

    def __init__(self, spec: StageSpec) -> None:
        import torch

        from interplab.models.loading import load_model

        torch.set_num_threads(max(1, spec.threads))
        self.spec = spec
        self.hooked = load_model(
            spec.model,
            dtype=spec.dtype,
            seed=spec.seed,
            device=spec.device,
            layers=(spec.start, spec.stop),
            with_embed=spec.first,
            with_head=spec.last,
        )
        if spec.model.startswith("tiny-"):
            self.hooked.model.to(torch.device(spec.device))
        self.graphs = KeptGraphs()
        self.params = StageParameters(self.hooked, spec)
        self.passes = StageForward(self.hooked, spec, self.graphs, StageWriters(spec.start, spec.stop, spec.first))
        self.backprop = StageBackward(self.hooked, spec.device, self.graphs)

    # ------------------------------------------------------------------ bookkeeping
    def ping(self) -> tuple[int, int]:
        """``(pid, optimizer steps taken)``: liveness, and whether a restart lost training state."""
        return os.getpid(), self.params.steps

    def drop(self, call: int) -> None:
        """Forget the kept graphs of a call (after a failure elsewhere in the pipeline)."""
        self.graphs.drop(call)

    # ------------------------------------------------------------------ forward and backward
    @_stage_errors
    def forward(self, task: StageTask, hidden: torch.Tensor | None) -> tuple[torch.Tensor | None, Any]:
        """Run this stage on a micro-batch: ``(output for the next stage, side result)``."""
        return self.passes.forward(task, hidden)

    @_stage_errors
    def finish(self, call: int, mbs: Sequence[int], batch: TokenBatch, fn: Callable[..., torch.Tensor], mode: Mode) -> list[Any]:
        """Last stage: evaluate ``fn`` on the call's logits and start the backward pass."""
        return self.backprop.finish(call, mbs, batch, fn, mode)

    @_stage_errors
    def outputs(self, call: int, mbs: Sequence[int]) -> torch.Tensor:
        return self.backprop.outputs(call, mbs)

    @_stage_errors
    def backward_outputs(self, call: int, mbs: Sequence[int], grad: torch.Tensor) -> list[Any]:
        return self.backprop.backward_outputs(call, mbs, grad)

    @_stage_errors
    def backward(self, call: int, mb: int, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ActivationCache | None]:
        return self.backprop.backward(call, mb, grad_out)

    # ------------------------------------------------------------------ parameters and optimizer
    @_stage_errors
    def parameter_names(self) -> list[str]:
        """Full model names of the parameters this stage holds."""
        return self.params.names()

    @_stage_errors
    def parameters(self) -> dict[str, torch.Tensor]:
        """This stage's parameters (CPU copies), for checks and checkpoints."""
        return self.params.values()

    @_stage_errors
    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> int:
        return self.params.set(values)

    @_stage_errors
    def init_optimizer(self, adam: AdamConfig, trainable: list[str] | None = None) -> int:
        return self.params.init_optimizer(adam, trainable)

    @_stage_errors
    def release_optimizer(self) -> int:
        """Drop the optimizer (and leave the replicas' gradient group); every parameter requires grad."""
        from interplab.runtime import collective

        count = self.params.release_optimizer()
        collective.leave()
        return count

    @_stage_errors
    def tied_grad(self) -> torch.Tensor | None:
        return self.params.tied_grad()

    @_stage_errors
    def add_tied_grad(self, other: torch.Tensor | None) -> bool:
        return self.params.add_tied_grad(other)

    @_stage_errors
    def step(self, call: int) -> int:
        steps = self.params.step()
        self.graphs.drop(call)
        return steps

    # ------------------------------------------------------------------ collectives
    @_stage_errors
    def grad_group_address(self) -> str:
        """A free ``host:port`` on this actor's node, for the replicas' gradient group rendezvous."""
        from interplab.runtime import collective

        return collective.free_address()

    @_stage_errors
    def join_grad_group(self, address: str, rank: int, world: int) -> int:
        """Join this stage index's gradient group (one rank per replica; blocks until all joined)."""
        import torch

        from interplab.runtime import collective

        collective.join(address, rank, world, torch.device(self.spec.device))
        return rank

    @_stage_errors
    def all_reduce_grads(self) -> int:
        """Sum the trainable parameters' gradients over the replicas (see :mod:`interplab.runtime.collective`)."""
        from interplab.runtime import collective

        if not collective.joined():
            raise RuntimeError("this stage has not joined a gradient group: the pipeline sets one up in init_optimizer")
        return collective.all_reduce_grads(self.params.trained())


def stage_actor_class() -> Any:
    """The Ray actor class for :class:`StageWorker` (created lazily: importing this module needs no Ray)."""
    import ray

    return ray.remote(StageWorker)


__all__ = ["AdamConfig", "Mode", "StageSpec", "StageTask", "StageWorker", "stage_actor_class"]
