"""Training steps on either backend: one Adam per process (single process) or per stage (pipeline).

    with make_trainer(backend, AdamConfig(lr=1e-4), trainable=names) as trainer:
        loss = trainer.step(prompts, loss_fn)   # loss_fn(logits [b, s, vocab], batch) -> scalar

A pipeline step equals the single-process step: the loss is evaluated on the whole batch on the last
stage, gradients flow back stage by stage, a tied embedding's two copies (first and last stage) get
the sum of both gradients, and each stage's Adam updates its own parameters.

``trainable`` (full parameter names as the single-process model's ``named_parameters()`` gives them;
None: all) limits training to a subset: Adam covers only those parameters and every other one gets
``requires_grad`` False, so it is never updated (bit for bit) and no gradient is computed for it.
With tied embeddings the embedding and head names are one parameter: naming either trains both
copies. ``close()`` (or leaving the ``with`` block) drops the optimizer state and gives every frozen
parameter its ``requires_grad`` back; a trainer that is never closed leaves them frozen.
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

    def close(self) -> None: ...

    def __enter__(self) -> Trainer: ...

    def __exit__(self, *exc) -> None: ...


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _local_trainable(model: HookedModel, trainable: Sequence[str]) -> list[torch.nn.Parameter]:
    """The parameters named in ``trainable`` (a tied parameter answers to each of its names)."""
    by_name = dict(model.model.named_parameters(remove_duplicate=False))
    unknown = [n for n in trainable if n not in by_name]
    if unknown:
        known = [n for n, _ in model.model.named_parameters()]
        raise ValueError(f"unknown parameter {unknown[0]!r}: the model has {len(known)} parameters, e.g. {known[:3]}")
    return list({id(by_name[n]): by_name[n] for n in trainable}.values())


class LocalTrainer(_Closing):
    """Adam over the trainable parameters of a :class:`HookedModel` in this process."""

    def __init__(self, model: HookedModel, adam: AdamConfig, trainable: Sequence[str] | None = None) -> None:
        self.model = model
        every = list(model.model.parameters())
        self._requires_grad = [(p, p.requires_grad) for p in every]
        params = every if trainable is None else _local_trainable(model, trainable)
        if not params:
            raise ValueError("trainable is empty: no parameter would be trained")
        keep = {id(p) for p in params}
        for param in every:
            param.requires_grad_(id(param) in keep)
        self.optimizer = torch.optim.Adam(params, lr=adam.lr, betas=adam.betas, eps=adam.eps, weight_decay=adam.weight_decay)

    def step(self, prompts: Prompts, loss_fn: Metric, *, interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        if self.optimizer is None:
            raise RuntimeError("this trainer is closed")
        result = self.model.run(prompts, interventions=interventions, grad=True)
        loss = loss_fn(result.logits, result.batch)
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> None:
        """Restore every parameter's ``requires_grad`` as it was before and drop the optimizer."""
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)
        self.optimizer = None


class PipelineTrainer(_Closing):
    """Adam per stage of a :class:`~interplab.runtime.pipeline.PipelineModel` (state stays in the actors)."""

    def __init__(self, model, adam: AdamConfig, trainable: Sequence[str] | None = None) -> None:
        self.model = model
        model._init_optimizer(adam, trainable)
        self._open = True

    def step(self, prompts: Prompts, loss_fn: Metric, *, interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        if not self._open:
            raise RuntimeError("this trainer is closed")
        return self.model._train_step(prompts, loss_fn, interventions=interventions)

    def close(self) -> None:
        """Drop the stages' optimizer state; every parameter requires grad again."""
        if self._open:
            self.model._release_optimizer()
            self._open = False


def make_trainer(backend, adam: AdamConfig | None = None, trainable: Sequence[str] | None = None) -> Trainer:
    """A trainer for either backend (the analysis need not know which one it has); see the module docstring."""
    from interplab.runtime.pipeline import PipelineModel

    adam = adam or AdamConfig()
    if isinstance(backend, PipelineModel):
        return PipelineTrainer(backend, adam, trainable)
    return LocalTrainer(backend, adam, trainable)
