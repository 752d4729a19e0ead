"""The values that cross the backend interface: prompts in, run and gradient results out, and the
typed request for a pass that starts mid-model (:class:`StageRequest`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from interplab.engine.cache import ActivationCache
from interplab.engine.interventions import Intervention
from interplab.engine.plan import Fork, KVPrefix
from interplab.engine.tokens import TokenBatch

Prompts = str | Sequence[str] | TokenBatch
LogitsMode = Literal["all", "last", "none"]
Metric = Callable[[torch.Tensor, TokenBatch], torch.Tensor]


@dataclass
class RunResult:
    """``logits`` is ``[b, s, vocab]`` (``logits="all"``), ``[b, vocab]`` (``"last"``) or None."""

    logits: torch.Tensor | None
    cache: ActivationCache
    batch: TokenBatch
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class GradResult:
    """The metric's value, the site gradients (same layout as captures) and any captures."""

    value: torch.Tensor
    grads: ActivationCache
    cache: ActivationCache
    logits: torch.Tensor


@dataclass(frozen=True, eq=False)
class StageRequest:
    """One forward pass over layers ``[start, stop)`` (see :meth:`HookedModel.run_stage`).

    Attributes:
        batch: the rows' tokens.
        start, stop: the block of decoder layers to run.
        hidden: ``[r, s, d]`` ``resid_pre`` at ``start`` of the rows that run from ``start`` (None:
            none do, or ``start == 0`` and the embedding runs first).
        with_head: finish with the final norm and unembedding (``stop`` must be the last layer).
        interventions: applied at their sites; rows may carry different patches.
        logits: ``"all"`` positions or each row's ``"last"`` real token.
        prefix: cached keys/values of the first positions (the pass computes the rest).
        joins: layer -> ``resid_pre`` rows (or a :class:`Fork` of rows in the batch) that join just before that layer.
        vocab: ``Long[k]``: the head computes only these logit columns.
    """

    batch: TokenBatch
    start: int
    stop: int
    hidden: torch.Tensor | None = None
    with_head: bool = False
    interventions: Sequence[Intervention] = field(default=())
    logits: LogitsMode = "all"
    prefix: KVPrefix | None = None
    joins: Mapping[int, torch.Tensor | Fork] | None = None
    vocab: torch.Tensor | None = None
