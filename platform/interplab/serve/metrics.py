"""Gradient metrics a served model can compute: declared as data, never a Python callable on the wire.

    metric = TokenMetric("logit_diff", answer=mary_id, wrong=john_id)   # mean over rows
    remote.gradients(prompts, metric, ["resid_pre.3"], logits="last")
    local.gradients(prompts, metric, ["resid_pre.3"], logits="last")      # the same object works locally

A :class:`TokenMetric` names a registered per-row metric of :mod:`interplab.analyses.metrics`
(``logit_diff``, ``prob``, ``logprob``) computed on each row's logits at its last real token (from
``logits="last"``, or picked out of ``logits="all"``), then reduced over rows. It is a callable
``(logits, batch) -> scalar`` like any metric, so analyses can use it with every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from interplab.engine.tokens import TokenBatch

WIRE_METRICS = ("logit_diff", "prob", "logprob")
Tokens = int | Sequence[int]


@dataclass(frozen=True)
class TokenMetric:
    """``reduce`` over rows of metric ``name`` at each row's last token.

    Attributes:
        name: one of :data:`WIRE_METRICS`.
        answer: the answer token id, one for every row or one per row.
        wrong: the wrong token id(s) (``logit_diff`` only).
        reduce: ``"mean"`` or ``"sum"`` over rows.
    """

    name: str
    answer: Tokens
    wrong: Tokens | None = None
    reduce: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        if self.name not in WIRE_METRICS:
            raise ValueError(f"metric {self.name!r} is not a served metric; use one of {', '.join(WIRE_METRICS)}")
        if (self.name == "logit_diff") != (self.wrong is not None):
            need = "needs" if self.name == "logit_diff" else "takes no"
            raise ValueError(f"metric {self.name!r} {need} wrong token ids")
        if self.reduce not in ("mean", "sum"):
            raise ValueError(f"metric reduce must be 'mean' or 'sum', got {self.reduce!r}")
        for field in ("answer", "wrong"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, int):
                object.__setattr__(self, field, tuple(int(v) for v in value))

    def __call__(self, logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        from interplab.analyses.metrics import MetricInputs, get_metric

        rows = batch.size
        if logits.ndim == 3:  # logits="all": each row's last real token
            logits = logits[torch.arange(rows, device=logits.device), batch.last_positions().to(logits.device)]
        answer = _per_row(self.answer, rows, "answer")
        wrong = _per_row(self.wrong if self.wrong is not None else self.answer, rows, "wrong")
        values = get_metric(self.name)(logits, MetricInputs(answer, wrong))
        return values.mean() if self.reduce == "mean" else values.sum()

    def to_json(self) -> dict[str, object]:
        def ids(value: Tokens | None) -> object:
            return value if value is None or isinstance(value, int) else list(value)

        return {"name": self.name, "answer": ids(self.answer), "wrong": ids(self.wrong), "reduce": self.reduce}


def _per_row(value: Tokens, rows: int, what: str) -> torch.Tensor:
    ids = torch.as_tensor([value] if isinstance(value, int) else list(value), dtype=torch.long)
    if len(ids) == 1:
        return ids.expand(rows)
    if len(ids) != rows:
        raise ValueError(f"metric {what}: {len(ids)} token ids for a batch of {rows} rows (give one, or one per row)")
    return ids


def check_wire_metric(metric: object) -> TokenMetric:
    """The metric as sent to a service, or a TypeError saying what a served model accepts."""
    if isinstance(metric, TokenMetric):
        return metric
    raise TypeError(
        f"a served model computes gradients of declared metrics only, got {type(metric).__name__}: "
        "use interplab.serve.TokenMetric(name, answer=..., wrong=...) with name one of "
        f"{', '.join(WIRE_METRICS)} (a Python callable cannot be sent to the service)"
    )
