"""Patching metrics, computed per row from the logits at each row's last position.

A metric maps ``logits`` ``[rows, vocab]`` and a :class:`MetricInputs` (the rows' answer and wrong
token ids and, for ``kl``, the clean run's log-probabilities) to one value per row. Custom metrics
register with :func:`register_metric`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from interplab.engine.results import RunResult


@dataclass(frozen=True)
class MetricInputs:
    answer: torch.Tensor  # Long[rows]
    wrong: torch.Tensor  # Long[rows]
    clean_logprobs: torch.Tensor | None = None  # [rows, vocab]

    def select(self, rows: torch.Tensor) -> MetricInputs:
        lp = self.clean_logprobs[rows] if self.clean_logprobs is not None else None
        return MetricInputs(self.answer[rows], self.wrong[rows], lp)


Metric = Callable[[torch.Tensor, MetricInputs], torch.Tensor]
_METRICS: dict[str, Metric] = {}
_TOKEN_ONLY: set[str] = set()  # metrics that read only the answer and wrong tokens' logits


def register_metric(name: str, *, answer_and_wrong_only: bool = False) -> Callable[[Metric], Metric]:
    """Register a metric. ``answer_and_wrong_only``: it reads no logits but the answer and wrong
    tokens' (no softmax over the vocabulary), so drivers may compute just those columns."""

    def wrap(fn: Metric) -> Metric:
        _METRICS[name] = fn
        _TOKEN_ONLY.discard(name)
        if answer_and_wrong_only:
            _TOKEN_ONLY.add(name)
        return fn

    return wrap


def metric_vocab(name: str, inputs: MetricInputs) -> tuple[torch.Tensor | None, MetricInputs]:
    """The vocabulary columns metric ``name`` reads for these rows (None: all of them), and
    ``inputs`` with the answer/wrong ids re-indexed into those columns."""
    if name not in _TOKEN_ONLY:
        return None, inputs
    vocab, index = torch.unique(torch.cat([inputs.answer, inputs.wrong]), return_inverse=True)
    n = len(inputs.answer)
    return vocab, MetricInputs(index[:n], index[n:])  # such a metric reads no clean log-probabilities


def run_logits(result: RunResult) -> torch.Tensor:
    """The logits of a run that asked for them (``logits="all"`` or ``"last"``)."""
    if result.logits is None:
        raise ValueError("the run returned no logits; metrics need a run with logits='all' or logits='last'")
    return result.logits


def get_metric(name: str) -> Metric:
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(sorted(_METRICS))}")
    return _METRICS[name]


def metric_names() -> list[str]:
    return sorted(_METRICS)


def _pick(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, ids.to(values.device)[:, None])[:, 0]


@register_metric("logit_diff", answer_and_wrong_only=True)
def logit_diff(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """logit(answer) - logit(wrong)."""
    return _pick(logits, inputs.answer) - _pick(logits, inputs.wrong)


@register_metric("prob")
def answer_prob(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """Probability of the answer token."""
    return _pick(logits.float().softmax(-1), inputs.answer)


@register_metric("logprob")
def answer_logprob(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """Log-probability of the answer token."""
    return _pick(logits.float().log_softmax(-1), inputs.answer)


@register_metric("kl")
def kl_from_clean(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """KL(clean || this run) of the next-token distributions (0 for the clean run itself)."""
    if inputs.clean_logprobs is None:
        raise ValueError("metric 'kl' needs the clean run's log-probabilities")
    logp = logits.float().log_softmax(-1)
    clean = inputs.clean_logprobs.to(logp.device)
    return (clean.exp() * (clean - logp)).sum(-1)
