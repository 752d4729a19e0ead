"""Training steps in this process: Adam over a :class:`~interplab.engine.hooked.HookedModel`'s parameters.

    with model.trainer(AdamConfig(lr=1e-4), trainable=names) as trainer:
        loss = trainer.step(prompts, loss_fn)   # loss_fn(logits [b, s, vocab], batch) -> scalar

Every backend's ``trainer`` returns a :class:`Trainer`; a pipeline's keeps one Adam per stage in its
actors and gives the same steps (see :mod:`interplab.runtime.training`).

``trainable`` (full parameter names as the single-process model's ``named_parameters()`` gives them;
None: all) limits training to a subset: Adam covers only those parameters and every other one gets
``requires_grad`` False, so it is never updated (bit for bit) and no gradient is computed for it.
With tied embeddings the embedding and head names are one parameter: naming either trains both
copies. ``close()`` (or leaving the ``with`` block) drops the optimizer state and gives every frozen
parameter its ``requires_grad`` back; a trainer that is never closed leaves them frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from interplab.engine.interventions import Intervention
from interplab.engine.tokens import TokenBatch

if TYPE_CHECKING:
    from interplab.engine.hooked import HookedModel, Prompts

T = TypeVar("T", bound="ClosingTrainer")
LossFn = Callable[[torch.Tensor, TokenBatch], torch.Tensor]


@dataclass(frozen=True)
class AdamConfig:
    """``torch.optim.Adam`` settings (a pipeline keeps one optimizer per stage, each with its own state)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def optimizer(self, params: Sequence[torch.nn.Parameter]) -> torch.optim.Adam:
        return torch.optim.Adam(list(params), lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


class Trainer(Protocol):
    """Optimizer steps on a backend's weights; a context manager that releases the optimizer on exit."""

    def step(self, prompts: Prompts, loss_fn: LossFn, *, interventions: Sequence[Intervention] = ()) -> torch.Tensor: ...

    def close(self) -> None: ...

    def __enter__(self) -> Trainer: ...

    def __exit__(self, *exc: object) -> None: ...


class ClosingTrainer:
    """``with`` support for trainers: ``close()`` on exit."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def named_subset(model: torch.nn.Module, trainable: Sequence[str]) -> list[torch.nn.Parameter]:
    """The parameters named in ``trainable`` (a tied parameter answers to each of its names)."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in trainable if n not in by_name]
    if unknown:
        known = [n for n, _ in model.named_parameters()]
        raise ValueError(f"unknown parameter {unknown[0]!r}: the model has {len(known)} parameters, e.g. {known[:3]}")
    return list({id(by_name[n]): by_name[n] for n in trainable}.values())


class LocalTrainer(ClosingTrainer):
    """Adam over the trainable parameters of a :class:`HookedModel` in this process."""

    def __init__(self, model: HookedModel, adam: AdamConfig, trainable: Sequence[str] | None = None) -> None:
        self.model = model
        every: list[torch.nn.Parameter] = list(model.model.parameters())
        self._requires_grad = [(p, p.requires_grad) for p in every]
        params = every if trainable is None else named_subset(model.model, trainable)
        if not params:
            raise ValueError("trainable is empty: no parameter would be trained")
        keep = {id(p) for p in params}
        for param in every:
            param.requires_grad_(id(param) in keep)
        self.optimizer: torch.optim.Adam | None = adam.optimizer(params)

    def step(self, prompts: Prompts, loss_fn: LossFn, *, interventions: Sequence[Intervention] = ()) -> torch.Tensor:
        if self.optimizer is None:
            raise RuntimeError("this trainer is closed")
        result = self.model.run(prompts, interventions=interventions, grad=True)
        if result.logits is None:
            raise RuntimeError("a training pass returned no logits")
        loss = loss_fn(result.logits, result.batch)
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> None:
        """Restore every parameter's ``requires_grad`` as it was before and drop the optimizer."""
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)
        self.optimizer = None
