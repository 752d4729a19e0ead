"""Training steps on a pipeline: one Adam per stage, state kept in the stage actors.

A pipeline step equals the single-process step (:class:`~interplab.engine.training.LocalTrainer`):
the loss is evaluated on the whole batch on the last stage, gradients flow back stage by stage, a
tied embedding's two copies (first and last stage) get the sum of both gradients, and each stage's
Adam updates its own parameters. With several replicas the driver evaluates the loss over every
replica's logits and the stages all-reduce their gradients (:mod:`interplab.runtime.replicated`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from interplab.engine.interventions import Intervention
from interplab.engine.training import AdamConfig, ClosingTrainer, LossFn, Trainer
from interplab.runtime import cluster
from interplab.runtime.errors import StageError, reraise
from interplab.runtime.replicated import replicated_backward

if TYPE_CHECKING:
    from interplab.engine.backend import Backend
    from interplab.engine.hooked import HookedModel, Prompts
    from interplab.runtime.parameters import PipelineWeights
    from interplab.runtime.scheduler import Scheduler


class PipelineTrainer(ClosingTrainer):
    """Adam per stage of a pipeline (see the module docstring)."""

    def __init__(
        self,
        scheduler: Scheduler,
        weights: PipelineWeights,
        skeleton: HookedModel,
        adam: AdamConfig,
        trainable: Sequence[str] | None = None,
    ) -> None:
        self.scheduler, self.weights, self.skeleton = scheduler, weights, skeleton
        weights.init_optimizer(adam, trainable)
        self.steps = 0
        self._open = True

    def step(self, prompts: Prompts, loss_fn: LossFn, *, interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        """One optimizer step over ``prompts``."""
        import ray

        if not self._open:
            raise RuntimeError("this trainer is closed")
        batch = self.skeleton.tokenize(prompts)
        for item in interventions:
            self.skeleton.validate_site(item.site)
        scheduler = self.scheduler
        replicas = scheduler.replicas
        for replica in replicas:
            if any(steps != self.steps for _, steps in cluster.wait_alive(replica)):
                spec = scheduler.specs[0]
                raise StageError(
                    spec.index,
                    (spec.start, spec.stop),
                    [],
                    "TrainingStateLost",
                    "a stage actor restarted and lost its weights and optimizer state; restart training from a checkpoint",
                )
        try:
            if len(replicas) == 1:  # the loss is evaluated on the last stage
                _, summary, _ = scheduler.backward_call(
                    batch,
                    loss_fn,
                    mode="train",
                    capture=[],
                    grad_sites=[],
                    interventions=interventions,
                    positions=None,
                    logits="all",
                    replica=0,
                )
                value = summary["value"]
            else:  # data parallel: the driver evaluates the loss on every replica's logits
                value = replicated_backward(scheduler, batch, loss_fn, interventions)
            if scheduler.n_stages > 1 and self.weights.tied is not None:
                for replica in replicas:
                    first, last = replica.actors[0].tied_grad.remote(), replica.actors[-1].tied_grad.remote()
                    ray.get([replica.actors[0].add_tied_grad.remote(last), replica.actors[-1].add_tied_grad.remote(first)])
            call = scheduler.new_call()
            ray.get([a.step.remote(call) for replica in replicas for a in replica.actors])
        except Exception as exc:  # noqa: BLE001
            reraise(exc)
        self.steps += 1
        return value

    def close(self) -> None:
        """Drop the stages' optimizer state; every parameter requires grad again."""
        if self._open:
            self.weights.release_optimizer()
            self._open = False


def make_trainer(backend: Backend, adam: AdamConfig | None = None, trainable: Sequence[str] | None = None) -> Trainer:
    """``backend.trainer(adam, trainable)``: a trainer for any backend (see :class:`~interplab.engine.training.Trainer`)."""
    return backend.trainer(adam or AdamConfig(), trainable)
