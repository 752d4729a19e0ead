"""Rank and log-probability of the correct answer among its options, at each prompt's last token.

    result = evaluate(model, data["ImplF_prime"])
    result.mean_rank, result.mean_logprob       # 0 = the answer's first token has the top logit

The rank of an example is the number of its options whose first token has a strictly larger logit
than the answer's first token (0-indexed; ties favour the answer). The log-probability is that of
the answer's first token under the full-vocabulary softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from interplab.analyses.grafting.data import Example, first_token


@dataclass(frozen=True)
class EvalResult:
    ranks: list[int]
    logprobs: list[float]
    n_options: int

    @property
    def mean_rank(self) -> float:
        return sum(self.ranks) / len(self.ranks)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)


def answer_ids(tokenizer, examples: Sequence[Example]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """First-token ids of each answer ``Long[n]`` and of each example's options."""
    answers = torch.tensor([first_token(tokenizer, ex.answer) for ex in examples], dtype=torch.long)
    options = [torch.tensor([first_token(tokenizer, o) for o in ex.options], dtype=torch.long) for ex in examples]
    return answers, options


def ranks_from_logits(
    logits: torch.Tensor, answers: torch.Tensor, options: Sequence[torch.Tensor]
) -> tuple[list[int], list[float]]:
    """``logits[n, vocab]`` at the last positions → (ranks among options, answer log-probabilities)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    ranks, lps = [], []
    for i in range(logits.shape[0]):
        correct = logits[i, answers[i]]
        ranks.append(int((logits[i, options[i]] > correct).sum()))
        lps.append(float(logprobs[i, answers[i]]))
    return ranks, lps


@torch.no_grad()
def evaluate(model, examples: Sequence[Example], *, batch_size: int = 32) -> EvalResult:
    """Ranks and log-probabilities of ``examples`` under the model's current weights (either backend)."""
    if not examples:
        raise ValueError("evaluate needs at least one example")
    answers, options = answer_ids(model.tokenizer, examples)
    ranks: list[int] = []
    lps: list[float] = []
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        logits = model.run([ex.prompt for ex in part], logits="last").logits
        r, lp = ranks_from_logits(logits, answers[start : start + len(part)], options[start : start + len(part)])
        ranks += r
        lps += lp
    return EvalResult(ranks, lps, max(len(o) for o in options))
