"""Finetuning on facts: Adam at a constant learning rate, loss on the answer tokens only.

    config = FinetuneConfig(lr=3e-5, epochs=6, batch_size=5, seed=0)
    losses = finetune(model, data["F"], config, layers=(0, 22))    # train only layers 0..21

Each call builds a fresh optimizer (``interplab.runtime.make_trainer``), so it runs unchanged on the
single-process model and on a Ray pipeline of stage actors. An example is ``prompt + answer``
tokenised as ``encode(prompt) + encode(answer, no special tokens)``; the loss is the mean
cross-entropy of every answer token given what precedes it (prompt tokens carry no loss). Every
epoch visits the examples in a new seeded order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from interplab.analyses.grafting.data import Example
from interplab.analyses.grafting.weights import trainable_names
from interplab.engine.backend import Backend
from interplab.engine.tokens import TokenBatch, encode, pad_id
from interplab.engine.training import AdamConfig

IGNORE = -100


@dataclass(frozen=True)
class FinetuneConfig:
    """Adam (β = 0.9, 0.999; ε = ``adam_eps``; no weight decay) at a constant learning rate."""

    lr: float = 3e-5
    epochs: int = 6
    batch_size: int = 5
    seed: int = 0
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be at least 1, got {self.epochs}, {self.batch_size}")


@dataclass
class TargetLoss:
    """Mean cross-entropy over answer tokens: ``labels[b, s]`` holds the token predicted at each
    position (``-100`` elsewhere). Picklable: a pipeline evaluates it on the last stage."""

    labels: torch.Tensor

    def __call__(self, logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        labels = self.labels.to(logits.device)
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE
        )


@dataclass
class TrainLog:
    """Per-step losses (with their epoch) of one finetune."""

    steps: list[tuple[int, float]] = field(default_factory=list)


def training_batch(tokenizer, examples: Sequence[Example]) -> tuple[TokenBatch, TargetLoss]:
    """Right-padded ``prompt + answer`` ids and the loss on the answer tokens."""
    rows, labels = [], []
    for ex in examples:
        prompt = encode(tokenizer, ex.prompt)
        answer = list(tokenizer(ex.answer, add_special_tokens=False)["input_ids"])
        ids = prompt + answer
        label = [IGNORE] * len(ids)
        for j in range(len(answer)):
            label[len(prompt) - 1 + j] = answer[j]  # position i predicts token i + 1
        rows.append(ids)
        labels.append(label)
    batch = TokenBatch.from_ids(rows, pad_id(tokenizer))
    target = torch.full(batch.input_ids.shape, IGNORE, dtype=torch.long)
    for i, label in enumerate(labels):
        target[i, : len(label)] = torch.as_tensor(label)
    return batch, TargetLoss(target)


def batches(n: int, config: FinetuneConfig, epoch: int) -> list[list[int]]:
    """The example indices of each optimizer step of ``epoch`` (seeded by ``config.seed`` and ``epoch``)."""
    order = list(range(n))
    random.Random(config.seed * 1000 + epoch).shuffle(order)
    return [order[i : i + config.batch_size] for i in range(0, n, config.batch_size)]


def finetune(
    model: Backend,
    examples: Sequence[Example],
    config: FinetuneConfig,
    *,
    layers: tuple[int, int] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> TrainLog:
    """Train ``model`` in place on ``examples`` (only decoder layers ``[start, stop)`` when ``layers``:
    Adam covers only those, every other parameter keeps ``requires_grad`` False until the end).

    ``on_epoch(epoch)`` is called after each epoch (epochs count from 1), e.g. to evaluate.
    """
    if not examples:
        raise ValueError("finetune needs at least one example")
    log = TrainLog()
    trainable = None if layers is None else trainable_names(model, layers)
    if trainable is not None and not trainable:
        raise ValueError(f"layers {layers} select no parameters")
    with model.trainer(AdamConfig(lr=config.lr, eps=config.adam_eps), trainable=trainable) as trainer:
        for epoch in range(1, config.epochs + 1):
            for rows in batches(len(examples), config, epoch):
                batch, loss_fn = training_batch(model.tokenizer, [examples[i] for i in rows])
                loss = trainer.step(batch, loss_fn)
                log.steps.append((epoch, float(loss)))
            if on_epoch is not None:
                on_epoch(epoch)
    return log
