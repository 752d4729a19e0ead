"""Training steps on either backend: one Adam per process (single process) or per stage (pipeline).

    trainer = make_trainer(backend, AdamConfig(lr=1e-4))
    loss = trainer.step(prompts, loss_fn)      # loss_fn(logits [b, s, vocab], batch) -> scalar

A pipeline step equals the single-process step: the loss is evaluated on the whole batch on the last
stage, gradients flow back stage by stage, a tied embedding's two copies (first and last stage) get
the sum of both gradients, and each stage's Adam updates its own parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from interplab.engine.hooked import HookedModel, Metric, Prompts
from interplab.engine.interventions import Intervention
from interplab.runtime.stage import AdamConfig


class Trainer(Protocol):
    def step(self, prompts: Prompts, loss_fn: Metric, *, interventions: Sequence[Intervention] = ()) -> torch.Tensor: ...


class LocalTrainer:
    """Adam over all parameters of a :class:`HookedModel` in this process."""

    def __init__(self, model: HookedModel, adam: AdamConfig) -> None:
        self.model = model
        self.optimizer = torch.optim.Adam(
            model.model.parameters(), lr=adam.lr, betas=adam.betas, eps=adam.eps, weight_decay=adam.weight_decay
        )

    def step(self, prompts: Prompts, loss_fn: Metric, *, interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        result = self.model.run(prompts, interventions=interventions, grad=True)
        loss = loss_fn(result.logits, result.batch)
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class PipelineTrainer:
    """Adam per stage of a :class:`~interplab.runtime.pipeline.PipelineModel` (state stays in the actors)."""

    def __init__(self, model, adam: AdamConfig) -> None:
        self.model = model
        model._init_optimizer(adam)

    def step(self, prompts: Prompts, loss_fn: Metric, *, interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        return self.model._train_step(prompts, loss_fn, interventions=interventions)


def make_trainer(backend, adam: AdamConfig | None = None) -> Trainer:
    """A trainer for either backend (the analysis need not know which one it has)."""
    from interplab.runtime.pipeline import PipelineModel

    adam = adam or AdamConfig()
    if isinstance(backend, PipelineModel):
        return PipelineTrainer(backend, adam)
    return LocalTrainer(backend, adam)
